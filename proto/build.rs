//! Generates Rust code for `proto/treaty/v1/*.proto` with protox, a protobuf compiler
//! written in Rust, so that building needs no system `protoc`. The encoded descriptor
//! set is written beside the code for gRPC server reflection.

use std::path::PathBuf;

const PROTO_FILES: [&str; 4] = [
    "treaty/v1/coordinator.proto",
    "treaty/v1/participant.proto",
    "treaty/v1/admin.proto",
    "treaty/v1/conformance.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTO_FILES, ["proto"])?;
    std::fs::write(
        out_dir.join("treaty_descriptor.bin"),
        prost_types_encode(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Malformed messages are INVALID_ARGUMENT (see src/codec.rs).
        .codec_path("crate::codec::TreatyCodec")
        .compile_fds(descriptors)?;
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed=proto/{file}");
    }
    Ok(())
}

fn prost_types_encode(descriptors: &prost_types::FileDescriptorSet) -> Vec<u8> {
    use prost::Message;
    descriptors.encode_to_vec()
}
