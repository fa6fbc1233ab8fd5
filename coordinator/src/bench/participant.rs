//! The participant `treaty bench` measures against: [`NoWork`], served by the SDK with a
//! durable barrier, in the bench's own process or as the hidden `treaty
//! bench-participant` child process (`--processes`). It votes YES and does nothing else,
//! so what is measured is Treaty: the gRPC calls and the barrier's durable writes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use treaty_sdk::durable::DurableStore;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

use super::cluster::{PARTICIPANT_LISTENING, PARTICIPANT_METRICS, serve_options};

/// A participant that votes YES (NO to the payload [`REJECT`]) and does nothing else.
#[derive(Debug)]
pub struct NoWork;

/// The payload of a branch or saga step [`NoWork`] rejects.
pub const REJECT: &[u8] = b"reject";

impl Participant for NoWork {
    async fn prepare(&self, _: &BranchContext, payload: &[u8]) -> Result<Vote, ParticipantError> {
        if payload == REJECT {
            return Ok(Vote::no("rejected by the bench"));
        }
        Ok(Vote::Yes)
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// `treaty bench-participant`: one bench participant as its own process (started by
/// `treaty bench --processes`; hidden from the help). Loopback addresses only: it
/// authenticates nobody.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchParticipantArgs {
    /// gRPC address (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// `/metrics` address (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_listen: SocketAddr,
    /// Where the barrier's durable store lives.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Records of final branches are collected this long after their transaction was
    /// created.
    #[arg(long)]
    pub barrier_retention_ms: Option<u64>,
}

/// Serves [`NoWork`] until SIGINT or SIGTERM, printing its two addresses on stdout.
pub async fn run(args: BenchParticipantArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "--listen must be a loopback address (the bench participant authenticates nobody)"
    );
    anyhow::ensure!(
        args.metrics_listen.ip().is_loopback(),
        "--metrics-listen must be a loopback address"
    );
    let store = Arc::new(
        DurableStore::open(&args.data_dir, Default::default())
            .with_context(|| format!("--data-dir {}", args.data_dir.display()))?,
    );
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let metrics = std::net::TcpListener::bind(args.metrics_listen)
        .with_context(|| format!("--metrics-listen {}", args.metrics_listen))?;
    println!("{PARTICIPANT_LISTENING}{}", listener.local_addr()?);
    println!("{PARTICIPANT_METRICS}{}", metrics.local_addr()?);
    let options = serve_options(args.barrier_retention_ms, metrics)?;
    treaty_sdk::serve(
        Arc::new(NoWork),
        store,
        listener,
        options,
        treaty_sdk::server::shutdown_signal(),
    )
    .await?;
    Ok(())
}
