//! What happened to a request, applied to the state: arrived, verified, corrupt (a strike),
//! failed (lost connections rest the source), and a source dropped.

use super::*;

impl Scheduler {
    /// Removes `request` from its source's window and its chunk's counts.
    pub(super) fn finish_request(&mut self, request: RequestId) -> Option<InFlight> {
        let r = self.requests.remove(&request)?;
        let len = self.chunk_len(r.chunk);
        let src = &mut self.sources[r.source];
        src.in_flight.remove(&request);
        src.in_flight_bytes -= len;
        let st = &mut self.chunks[r.chunk as usize];
        if r.arrived {
            st.checking -= 1;
        } else {
            st.fetching -= 1;
        }
        Some(r)
    }

    /// Puts `c` back at the front of the queue if nothing else will bring it.
    pub(super) fn requeue(&mut self, c: u32) {
        let st = &mut self.chunks[c as usize];
        if !st.done && !st.queued && st.fetching == 0 && st.checking == 0 {
            st.retried = true;
            self.enqueue(c);
            self.totals.retried_chunks += 1;
        }
    }

    pub(super) fn arrived(&mut self, request: RequestId) {
        let Some(r) = self.requests.get_mut(&request) else {
            return;
        };
        if r.arrived {
            return;
        }
        let (source, chunk) = (r.source, r.chunk);
        let done = self.chunks[chunk as usize].done;
        if done || !self.sources[source].live {
            // Not needed, or from a source dropped as a liar.
            if done {
                self.totals.duplicate_bytes += self.chunk_len(chunk);
            }
            self.finish_request(request);
            self.requeue(chunk);
            self.actions.push(Action::Discard { request });
            return;
        }
        // The chunk keeps its source's window slot until it is verified and written, so a slow
        // disk slows the requests instead of piling up chunks in memory.
        r.arrived = true;
        let st = &mut self.chunks[chunk as usize];
        st.fetching -= 1;
        st.checking += 1;
        self.actions.push(Action::Verify { request });
    }

    pub(super) fn verified(&mut self, request: RequestId, now: Instant) {
        let Some(r) = self.finish_request(request) else {
            return;
        };
        let len = self.chunk_len(r.chunk);
        if self.chunks[r.chunk as usize].done {
            self.totals.duplicate_bytes += len;
            return;
        }
        if self.is_rare(r.chunk) {
            self.count_rare(r.chunk, false);
        }
        self.chunks[r.chunk as usize].done = true;
        self.remaining -= 1;
        self.done_bytes += len;
        let src = &mut self.sources[r.source];
        src.report.bytes += len;
        src.report.chunks += 1;
        src.failures_in_a_row = 0;
        src.lost = 0;
        src.delivered(len, now);
        // The other copies are not needed any more.
        let copies: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, o)| o.chunk == r.chunk && !o.arrived)
            .map(|(&id, _)| id)
            .collect();
        for id in copies {
            self.finish_request(id);
            self.actions.push(Action::Cancel { request: id });
        }
    }

    pub(super) fn corrupt(&mut self, request: RequestId) {
        let Some(r) = self.finish_request(request) else {
            return;
        };
        self.chunks[r.chunk as usize].failed_by |= bit(r.source);
        let src = &mut self.sources[r.source];
        src.report.corrupt += 1;
        if src.live && src.report.corrupt >= self.opts.max_strikes {
            let reason = format!("sent {} corrupt chunks", src.report.corrupt);
            self.drop_source(r.source, reason);
        }
        self.requeue(r.chunk);
    }

    pub(super) fn failed(&mut self, request: RequestId, lost: bool, reason: String, now: Instant) {
        let Some(r) = self.finish_request(request) else {
            return;
        };
        let (s, c) = (r.source, r.chunk);
        if self.chunks[c as usize].done {
            return;
        }
        let opts = &self.opts;
        let src = &mut self.sources[s];
        src.report.failures += 1;
        src.failures_in_a_row += 1;
        // A lost connection says nothing about the chunk: after reconnecting, the source may take
        // it again. A timeout or an error answer does.
        if !lost {
            self.chunks[c as usize].failed_by |= bit(s);
        }
        let resting = src.resting_until.is_some_and(|t| t > now);
        if src.live && lost && !resting && src.lost < opts.max_reconnects {
            // Rest, then the source reconnects on its next request.
            let rest = opts.reconnect_backoff * 2u32.pow(src.lost.min(16));
            src.lost += 1;
            src.report.reconnects += 1;
            let until = now + rest;
            src.resting_until = Some(until);
            self.actions.push(Action::Rest { source: s, until });
        } else if src.live && !resting && (lost || src.failures_in_a_row >= opts.max_failures) {
            self.drop_source(s, reason);
        }
        self.requeue(c);
    }

    /// Stops asking `s`; its requests not yet arrived are cancelled and their chunks queued again.
    pub(super) fn drop_source(&mut self, s: SourceId, reason: String) {
        let Some(src) = self.sources.get_mut(s) else {
            return;
        };
        if !src.live {
            return;
        }
        src.live = false;
        src.report.dropped = Some(reason.clone());
        self.actions.push(Action::Drop { source: s, reason });
        let held: Vec<u32> = self.sources[s].holds.iter().collect();
        for c in held {
            self.adjust_avail(c, false);
        }
        self.recount_whole();
        let asked: Vec<RequestId> = self.sources[s].in_flight.keys().copied().collect();
        for id in asked {
            if self.requests.get(&id).is_some_and(|r| !r.arrived)
                && let Some(r) = self.finish_request(id)
            {
                self.actions.push(Action::Cancel { request: id });
                self.requeue(r.chunk);
            }
        }
    }
}
