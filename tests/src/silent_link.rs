//! A TCP link on loopback between a client and a server that can go silent: after
//! [`SilentLink::go_silent`] it forwards nothing either way and closes nothing, as a
//! network path does when the far host loses power or a middlebox drops the flow. Only
//! the peers' own timeouts (an HTTP/2 ping unanswered, a call's deadline) can end what
//! waits on it.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Bytes read from one side before they are written to the other.
const CHUNK_BYTES: usize = 16 * 1024;

/// The link; dropping it closes every connection through it.
#[derive(Debug)]
pub struct SilentLink {
    /// `http://127.0.0.1:PORT`: connect here to reach the server through the link.
    pub endpoint: String,
    silent: watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl SilentLink {
    /// A link to the server at `server_endpoint` (`http://127.0.0.1:PORT`), forwarding
    /// until told to go silent.
    pub async fn start(server_endpoint: &str) -> Self {
        let server: SocketAddr = server_endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("an http://IP:PORT endpoint");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (silent, silenced) = watch::channel(false);
        let accepting = tokio::spawn(async move {
            // The pumps live as long as this task: aborted with it when the link drops.
            let mut pumps = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(server).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_reads, client_writes) = client.into_split();
                let (server_reads, server_writes) = server.into_split();
                pumps.spawn(pump(client_reads, server_writes, silenced.clone()));
                pumps.spawn(pump(server_reads, client_writes, silenced.clone()));
            }
        });
        Self {
            endpoint,
            silent,
            accepting,
        }
    }

    /// From now on nothing passes either way; every connection stays open.
    pub fn go_silent(&self) {
        self.silent.send_replace(true);
    }
}

impl Drop for SilentLink {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Copies `from` to `to` until either ends or the link goes silent; silent, it holds
/// both halves open without reading or writing.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut silenced: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = silenced.wait_for(|silent| *silent) => break,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if *silenced.borrow() || to.write_all(&buffer[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    // Silent: `from` and `to` stay open (held by this future), and nothing more passes.
    std::future::pending::<()>().await;
}
