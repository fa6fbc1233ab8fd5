//! The participant `treaty bench` measures against: [`NoWork`], served by the SDK with a
//! durable barrier, in the bench's own process or as the hidden `treaty
//! bench-participant` child process (`--processes`). It votes YES and does nothing else,
//! so what is measured is Treaty: the gRPC calls and the barrier's durable writes.
//!
//! For `treaty bench --recovery` it also keeps transactions in flight on purpose
//! (`--hold`): until the process gets SIGUSR1, a branch whose id starts with
//! [`HOLD_PREPARE`] has its prepare wait, and one whose id starts with [`HOLD_COMMIT`]
//! has its commit fail (a transient error: the coordinator keeps it decided and retries
//! with backoff, without holding a call open). After SIGUSR1 (or [`MAX_HOLD`]) every
//! call is answered at once, for good.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use treaty_sdk::durable::DurableStore;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

use super::cluster::{PARTICIPANT_LISTENING, PARTICIPANT_METRICS, ParticipantSettings};

/// A participant that votes YES (NO to the payload [`REJECT`]) and does nothing else;
/// with a hold, it keeps some branches in flight until released (see the module docs).
#[derive(Debug, Default)]
pub struct NoWork {
    /// `Some` while a hold may be on; the value turns true at the release.
    released: Option<tokio::sync::watch::Receiver<bool>>,
}

/// The payload of a branch or saga step [`NoWork`] rejects.
pub const REJECT: &[u8] = b"reject";
/// Branch ids whose prepare waits for the release.
pub const HOLD_PREPARE: &str = "hold-prepare-";
/// Branch ids whose commit fails until the release.
pub const HOLD_COMMIT: &str = "hold-commit-";
/// Longest a hold lasts without a release.
pub const MAX_HOLD: Duration = Duration::from_secs(600);

impl NoWork {
    /// Holding until `released` turns true.
    pub fn holding(released: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            released: Some(released),
        }
    }

    fn held(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.released.clone().filter(|released| !*released.borrow())
    }
}

impl Participant for NoWork {
    async fn prepare(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<Vote, ParticipantError> {
        if let Some(mut released) = self.held() {
            if branch.branch_id.starts_with(HOLD_PREPARE) {
                let _ = tokio::time::timeout(MAX_HOLD, released.wait_for(|r| *r)).await;
            }
        }
        if payload == REJECT {
            return Ok(Vote::no("rejected by the bench"));
        }
        Ok(Vote::Yes)
    }
    async fn commit(&self, branch: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        if self.held().is_some() && branch.branch_id.starts_with(HOLD_COMMIT) {
            return Err(ParticipantError::new("held by the bench until SIGUSR1"));
        }
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
    /// Hold branches named for it until SIGUSR1 (see the module docs).
    #[arg(long)]
    pub hold: bool,
    /// The in-doubt resolver's poll interval and age before asking (the SDK's default
    /// if not given).
    #[arg(long)]
    pub in_doubt_poll_ms: Option<u64>,
    /// Write a one-phase commit's or saga step's YES unforced (the SDK's
    /// `ServeOptions::unforced_one_phase_yes`).
    #[arg(long)]
    pub unforced_one_phase_yes: bool,
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
    let options = ParticipantSettings {
        barrier_retention_ms: args.barrier_retention_ms,
        in_doubt_poll_ms: args.in_doubt_poll_ms,
        unforced_one_phase_yes: args.unforced_one_phase_yes,
    }
    .serve_options(metrics)?;
    let participant = if args.hold {
        let (release, released) = tokio::sync::watch::channel(false);
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .context("listening for SIGUSR1")?;
        tokio::spawn(async move {
            usr1.recv().await;
            let _ = release.send(true);
        });
        NoWork::holding(released)
    } else {
        NoWork::default()
    };
    treaty_sdk::serve(
        Arc::new(participant),
        store,
        listener,
        options,
        treaty_sdk::server::shutdown_signal(),
    )
    .await?;
    Ok(())
}
