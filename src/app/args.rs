//! The command line as typed: clap's types for the subcommands and their flags, shared by the CLI
//! and the shell. Validation into the node's request types happens in `cli`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::model::peers::PeerId;
use crate::net::server::DEFAULT_MAX_UPLOAD_SIZE;
use crate::net::tls;
use crate::wire::codec;

/// qnode: share files among a fixed set of peers over QUIC, with pinned mutual TLS and verified,
/// collaborative downloads.
#[derive(Debug, Parser)]
#[command(name = "qnode", version, about, long_about = None)]
pub struct Cli {
    /// Folder holding peer_settings.txt, certs/ and one folder per local peer
    #[arg(
        long,
        env = "QNODE_ROOT",
        default_value = ".",
        global = true,
        value_name = "DIR"
    )]
    pub root: PathBuf,
    /// Who we are: a peer ID listed in peer_settings.txt
    #[arg(long, env = "QNODE_PEER", global = true, value_name = "ID")]
    pub peer: Option<PeerId>,
    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create this peer's served_files folder, key pair and certificate (certs/ID.pem), if missing
    Init,
    /// Serve our files to the other peers until SIGINT or SIGTERM
    Serve(ServeArgs),
    /// List the files served by peers (default: every other peer)
    #[command(visible_alias = "filelist")]
    List(ListArgs),
    /// Upload a file to peers
    Upload(UploadArgs),
    /// Download a file from the peers that serve it, all at once
    Download(DownloadArgs),
    /// Interactive client speaking the original #FILELIST / #UPLOAD / #DOWNLOAD lines
    Shell,
    /// Serve, and keep a folder identical with the same folder on peers that sync it too, until
    /// SIGINT or SIGTERM
    Sync(SyncArgs),
    /// For each folder synced here and each other peer: in sync or not, what is pending, the
    /// conflict copies kept
    Status(StatusArgs),
    /// The qnode nodes announcing themselves on the local network (mDNS), with their
    /// certificates' fingerprints, those not in our table marked
    Discover(DiscoverArgs),
}

/// Options of `discover`.
#[derive(Debug, Clone, Args)]
pub struct DiscoverArgs {
    /// How long to listen, in seconds
    #[arg(long, default_value_t = 3)]
    pub wait: u64,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

/// Options of `status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

/// Options of `sync`.
#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    /// Peers to sync with (default: every other listed peer)
    #[arg(value_name = "PEERS")]
    pub peers: Vec<PeerId>,
    /// The folder to sync, a path in served_files (default: all of served_files)
    #[arg(long, value_name = "PATH")]
    pub folder: Option<String>,
    /// Scan the whole folder this often (seconds), whatever the file-system events say
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub rescan: u64,
    /// One JSON object per line per event instead of text
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Options of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Largest upload accepted, in bytes
    #[arg(long, default_value_t = DEFAULT_MAX_UPLOAD_SIZE, value_name = "BYTES")]
    pub max_upload_size: u64,
    /// Listen on this address instead of the one peer_settings.txt gives us (e.g. 0.0.0.0:53234)
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Cap on the file data sent to all peers together, in bytes per second (suffixes K, M, G =
    /// KiB, MiB, GiB; e.g. 20M)
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_upload_rate: Option<u64>,
    /// Congestion controller for what we send
    #[arg(long, value_enum, default_value_t)]
    pub congestion: CongestionArg,
    /// Compress file data sent to qnode/2 peers: auto (while the link is slower than the
    /// compressor and the data shrinks), always (whenever it shrinks) or never
    #[arg(long, value_enum, default_value_t)]
    pub compression: CompressionArg,
    /// Cap on what the relays we run for peers behind NATs carry together, in bytes per
    /// second (suffixes as for --max-upload-rate)
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub relay_rate: Option<u64>,
    /// Most relays at once
    #[arg(long, value_name = "N", default_value_t = crate::net::server::relay::DEFAULT_MAX_RELAYED)]
    pub max_relayed: usize,
    /// Relay for no one
    #[arg(long)]
    pub no_relay: bool,
}

/// `--congestion`: the congestion controller a sender uses (`net::tls::Congestion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CongestionArg {
    /// CUBIC (RFC 9438), quinn's default.
    #[default]
    Cubic,
    /// BBR (experimental in quinn; it was slower serving a crowd in the swarm benchmark).
    Bbr,
    /// NewReno (RFC 9002).
    Newreno,
}

impl From<CongestionArg> for tls::Congestion {
    fn from(c: CongestionArg) -> Self {
        match c {
            CongestionArg::Cubic => Self::Cubic,
            CongestionArg::Bbr => Self::Bbr,
            CongestionArg::Newreno => Self::Newreno,
        }
    }
}

/// `--compression`: when a sender compresses (`wire::codec::Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CompressionArg {
    /// When the link is slower than the compressor and the bytes shrink.
    #[default]
    Auto,
    /// Whenever the bytes shrink.
    Always,
    /// Never.
    Never,
}

impl From<CompressionArg> for codec::Mode {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::Auto => Self::Auto,
            CompressionArg::Always => Self::Always,
            CompressionArg::Never => Self::Never,
        }
    }
}

/// Parses `123`, `64K`, `20M`, `1G` (binary multiples) into bytes.
fn parse_rate(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.trim().char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    match digits.trim().parse::<u64>() {
        Ok(n) if n > 0 => n
            .checked_mul(mult)
            .ok_or_else(|| format!("{s} is too large")),
        _ => Err(format!("{s:?} is not a positive rate such as 500K or 20M")),
    }
}

/// Options of `list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Peers to ask (default: every other peer)
    #[arg(value_name = "PEERS")]
    pub peers: Vec<PeerId>,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

/// Options of `upload`.
#[derive(Debug, Clone, Args)]
pub struct UploadArgs {
    /// A path, or the name of a file in our own served_files
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Peers to upload to
    #[arg(value_name = "PEERS", required = true)]
    pub peers: Vec<PeerId>,
    /// Replace a different file of that name at a peer (its old version is kept hidden there)
    #[arg(long)]
    pub replace: bool,
    /// Compress what is sent to qnode/2 peers: auto (while the link is slower than the
    /// compressor and the data shrinks), always (whenever it shrinks) or never
    #[arg(long, value_enum, default_value_t)]
    pub compression: CompressionArg,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

/// Options of `download`.
#[derive(Debug, Clone, Args)]
pub struct DownloadArgs {
    /// Name of the file to fetch
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Peers to fetch from (default: every other peer); only those serving NAME take part
    #[arg(value_name = "PEERS")]
    pub peers: Vec<PeerId>,
    /// Write here instead of our served_files/NAME (a folder means FOLDER/NAME)
    #[arg(long, short, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Fetch this version (BLAKE3 hex) when peers disagree; default: the one most peers serve
    #[arg(long, value_name = "HEX")]
    pub blake3: Option<String>,
    /// Chunk requests in flight per peer (default: adaptive, sized to each peer's rate × RTT)
    #[arg(long, value_name = "N")]
    pub window: Option<usize>,
    /// If we hold another version of NAME, bring it up to date: reuse its matching bytes, fetch
    /// the rest, replace it atomically (the old version is kept hidden)
    #[arg(long)]
    pub update: bool,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn contract_forms_parse() {
        for line in [
            "qnode --peer p1 serve",
            "qnode --root /tmp --peer p5 download hello_world.txt p1",
            "qnode --peer p5 list",
            "qnode --peer p5 filelist p1 p2 --json",
            "qnode --peer p5 upload notes.txt p1 p2",
            "qnode --peer p5 download x.txt --output /tmp/x --json",
            "qnode --peer p5 shell",
            "qnode --peer p5 init",
            "qnode --peer p5 download notes.txt p1 --update --json",
            "qnode --peer p5 upload notes.txt p1 --replace",
        ] {
            let args: Vec<&str> = line.split(' ').collect();
            assert!(Cli::try_parse_from(args).is_ok(), "{line}");
        }
        assert!(Cli::try_parse_from(["qnode", "--peer", "p5", "upload", "x.txt"]).is_err());
        assert_eq!(parse_rate("20M"), Ok(20 << 20));
        assert_eq!(parse_rate("500k"), Ok(500 << 10));
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert!(
            parse_rate("0").is_err()
                && parse_rate("fast").is_err()
                && parse_rate("99999999999G").is_err()
        );
        assert!(Cli::try_parse_from(["qnode", "--peer", "../x", "list"]).is_err());
    }
}
