//! `shell`: the seed's interactive client.
//!
//! Reads lines from stdin — `#FILELIST p1 p2`, `#UPLOAD name p1 p2`, `#DOWNLOAD name p1 p2`, plus
//! `help` and `quit` — turns each into the same `*Args` the subcommands use (the `#` and case are
//! optional, and the subcommands' flags work too, e.g. `#DOWNLOAD x.txt p1 --json`), and runs it with
//! the same [`Node`], so connections are reused across lines. An error is reported and the shell
//! carries on; EOF ends it. A prompt is shown on stderr when stdin is a terminal.

use std::io::IsTerminal;

use clap::Parser;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::app::args::Command;

const HELP: &str = "\
commands (the leading # is optional, case does not matter):
  #FILELIST [PEERS...]            list the files of PEERS (default: every other peer)
  #UPLOAD FILE PEERS...           upload FILE (a path, or a name in our served_files) to PEERS
  #DOWNLOAD NAME [PEERS...]       download NAME from PEERS together (default: every other peer)
  help                            this text
  quit                            leave (so does end of input)
flags of the matching subcommands work too, e.g. --json";

/// One parsed shell line.
#[derive(Debug)]
enum LineAction {
    Run(Command),
    Help,
    Quit,
}

#[derive(Debug, Parser)]
#[command(
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct Line {
    #[command(subcommand)]
    command: Command,
}

/// Parses one line; `Ok(None)` for a blank line or a `//`-less comment (`# ...` with a space).
fn parse(line: &str) -> Result<Option<LineAction>, String> {
    let mut words = line.split_whitespace();
    let Some(first) = words.next() else {
        return Ok(None);
    };
    if first == "#" {
        return Ok(None);
    }
    let verb = first.trim_start_matches('#').to_ascii_lowercase();
    let verb = match verb.as_str() {
        "help" | "?" => return Ok(Some(LineAction::Help)),
        "quit" | "exit" => return Ok(Some(LineAction::Quit)),
        "filelist" | "list" => "list",
        "upload" => "upload",
        "download" => "download",
        _ => return Err(format!("unknown command {first:?}; type help")),
    };
    let args = std::iter::once(verb).chain(words);
    match Line::try_parse_from(args) {
        Ok(l) => Ok(Some(LineAction::Run(l.command))),
        Err(e) => {
            let msg = e.to_string();
            let first_line = msg.lines().next().unwrap_or("invalid command");
            Err(first_line.trim_start_matches("error: ").to_owned())
        }
    }
}

/// Runs the shell until `quit` or end of input; `false` if any command failed.
pub async fn run(execute: impl AsyncFn(Command) -> anyhow::Result<bool>) -> bool {
    let interactive = std::io::stdin().is_terminal();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut all_ok = true;
    loop {
        if interactive {
            crate::errp!("qnode> ");
        }
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                crate::errln!("qnode: error: reading stdin: {e}");
                return false;
            }
        };
        match parse(&line) {
            Ok(None) => {}
            Ok(Some(LineAction::Quit)) => break,
            Ok(Some(LineAction::Help)) => crate::outln!("{HELP}"),
            Ok(Some(LineAction::Run(command))) => match execute(command).await {
                Ok(ok) => all_ok &= ok,
                Err(e) => {
                    crate::errln!("qnode: error: {}", crate::app::term::error_line(&e));
                    all_ok = false;
                }
            },
            Err(msg) => {
                crate::errln!("qnode: error: {msg}");
                all_ok = false;
            }
        }
    }
    all_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_lines_parse_into_the_subcommands() {
        match parse("#FILELIST p1 p2").unwrap() {
            Some(LineAction::Run(Command::List(a))) => assert_eq!(a.peers.len(), 2),
            other => panic!("{other:?}"),
        }
        match parse("#UPLOAD notes.txt p3").unwrap() {
            Some(LineAction::Run(Command::Upload(a))) => {
                assert_eq!(a.file.to_str(), Some("notes.txt"))
            }
            other => panic!("{other:?}"),
        }
        match parse("  download lorem_ipsum.txt p2 p3 p4 --json").unwrap() {
            Some(LineAction::Run(Command::Download(a))) => assert!(a.json && a.peers.len() == 3),
            other => panic!("{other:?}"),
        }
        // A folder, as on the command line.
        match parse("#DOWNLOAD notes/ p1 p2").unwrap() {
            Some(LineAction::Run(Command::Download(a))) => {
                assert_eq!((a.name.as_str(), a.peers.len()), ("notes/", 2))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse("quit").unwrap(), Some(LineAction::Quit)));
        assert!(matches!(parse("HELP").unwrap(), Some(LineAction::Help)));
        assert!(parse("   ").unwrap().is_none());
        assert!(parse("# a comment").unwrap().is_none());
        assert!(parse("#BOGUS x").is_err());
        assert!(parse("#UPLOAD onlyafile").is_err());
        assert!(parse("#SERVE").is_err());
    }
}
