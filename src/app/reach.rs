//! `discover` rendered: the qnode nodes announcing on the local network.

use super::term::print_json;
use crate::node::Node;

/// `discover`: one line per node heard (or one JSON object), those not in our table marked.
pub(super) async fn discover(node: &Node, wait_secs: u64, json: bool) -> anyhow::Result<bool> {
    let heard = node
        .discover(std::time::Duration::from_secs(wait_secs))
        .await?;
    if json {
        print_json(&serde_json::json!({ "peers": heard }))?;
        return Ok(true);
    }
    if heard.is_empty() {
        crate::outln!("no qnode node heard on the local network in {wait_secs} s");
    }
    for d in &heard {
        let mark = match d.standing {
            "listed" => "",
            "us" => "  (us)",
            "not listed" => {
                "  NOT LISTED: to add it, list it as `ID auto` and copy its certificate"
            }
            _ => "  ANOTHER CERTIFICATE than the one pinned for it: refused",
        };
        crate::outln!(
            "{} {} fingerprint {}{mark}",
            d.peer,
            d.addrs.join(","),
            d.fingerprint
        );
    }
    Ok(true)
}
