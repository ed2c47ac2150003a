//! The client side's UDP endpoints: one per address family, bound on first use and shared by
//! every connection a session makes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::net::tls;

/// A session's endpoints, by address family.
#[derive(Debug, Default)]
pub struct Endpoints {
    /// By "is IPv6". Only ever held for a lookup or insert of a whole entry.
    by_family: Mutex<HashMap<bool, quinn::Endpoint>>,
}

impl Endpoints {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<bool, quinn::Endpoint>> {
        // Never inconsistent: see `by_family`.
        self.by_family.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoint to reach `addr` from, bound now if it is the first of its family.
    pub fn for_addr(&self, addr: SocketAddr) -> Result<quinn::Endpoint, String> {
        let mut endpoints = self.lock();
        if let Some(e) = endpoints.get(&addr.is_ipv6()) {
            return Ok(e.clone());
        }
        let any: SocketAddr = if addr.is_ipv6() {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
        };
        let (endpoint, capped) = tls::bind_endpoint(any, None, None)
            .map_err(|e| format!("binding a UDP socket: {e}"))?;
        if let Some(granted) = capped {
            tracing::debug!("UDP receive buffer capped at {granted} bytes");
        }
        endpoints.insert(addr.is_ipv6(), endpoint.clone());
        Ok(endpoint)
    }

    /// Waits up to `grace` per endpoint for its connections' closes to leave.
    ///
    /// quinn's `wait_idle` waits out the draining period (3 × PTO, about 80 ms even on loopback,
    /// since PTO includes the 25 ms ACK delay) only to resend the close if it was lost; the close
    /// itself goes out at once. A lost close costs the peer an idle timeout, nothing else, so the
    /// wait is capped.
    pub async fn wait_idle(&self, grace: Duration) {
        let endpoints: Vec<quinn::Endpoint> = self.lock().values().cloned().collect();
        for endpoint in endpoints {
            let _ = tokio::time::timeout(grace, endpoint.wait_idle()).await;
        }
    }
}
