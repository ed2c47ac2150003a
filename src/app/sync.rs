//! `sync` and `status` rendered: one line (or one JSON object) per sync event, and each synced
//! folder's standing.

use super::term::print_json;
use crate::node::{self, Node};

/// One line for a `sync` event: text, or (`json`) one JSON object.
pub(crate) fn print_sync_event(e: &node::SyncEvent, json: bool) {
    use std::io::Write;
    let line = if json {
        serde_json::json!({
            "event": e.event,
            "name": e.name,
            "peer": e.peer,
            "bytes": e.bytes,
            "detail": e.detail,
        })
        .to_string()
    } else {
        let detail = match e.detail.as_str() {
            "" => String::new(),
            d => format!(" ({d})"),
        };
        match e.event {
            // Here, not from a peer.
            "changed" | "deleted" | "paused" => format!("{} {} here{detail}", e.event, e.name),
            _ => format!(
                "{} {} from {}, {} bytes on the wire{detail}",
                e.event, e.name, e.peer, e.bytes
            ),
        }
    };
    // A closed stdout ends nothing: sync goes on.
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// `status`: each synced folder, each peer's standing with it; false if a peer could not be
/// asked.
pub(super) async fn status(node: &Node, json: bool) -> anyhow::Result<bool> {
    let folders = node.sync_status().await;
    let ok = folders
        .iter()
        .all(|f| f.peers.iter().all(|p| p.error.is_none()));
    if json {
        print_json(&serde_json::json!({ "folders": folders }))?;
        return Ok(ok);
    }
    if folders.is_empty() {
        println!("no folder is synced here (qnode sync starts one)");
    }
    for f in &folders {
        let name = if f.folder.is_empty() {
            "served_files"
        } else {
            f.folder.as_str()
        };
        let marker = if f.marked {
            ""
        } else {
            ", its marker .qnodefolder is missing: not syncing"
        };
        println!(
            "{name}/: {} files, {} conflict copies kept{marker}",
            f.files,
            f.conflicts.len()
        );
        for c in &f.conflicts {
            println!("  conflict copy: {c}");
        }
        for p in &f.peers {
            match (&p.error, p.in_sync) {
                (Some(e), _) => println!("  {}: not reachable or not syncing it ({e})", p.peer),
                (None, true) => println!("  {}: in sync", p.peer),
                (None, false) => {
                    let more = if p.more { "+" } else { "" };
                    println!(
                        "  {}: {}{more} of its changes pending here",
                        p.peer, p.pending
                    );
                }
            }
        }
    }
    Ok(ok)
}
