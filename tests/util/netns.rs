//! A private multi-host network for tests and the benchmark (`benches/transfer.rs` includes this
//! file): each host is a network namespace joined by a veth pair to a bridge in a "switch"
//! namespace, on 10.99.0.0/24. Per-host uplink limits (`tc tbf`), random loss (`nft ... numgen
//! random`) and cutting a host's link are available. Everything is removed on drop, also when a
//! test fails. Traffic stays inside these namespaces.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};

/// Whether this process can build namespaces; if not, says so on stderr (uncaptured) and returns
/// false so the test can return early.
pub fn available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "tc", "nft", "ethtool"].iter().all(|t| have(t));
    if root && tools {
        return true;
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root and ip, tc, nft, ethtool (.ci/run installs them)"
    );
    false
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command given as one line (arguments separated by spaces).
fn sh(line: &str) -> anyhow::Result<()> {
    let args: Vec<&str> = line.split_whitespace().collect();
    sh_args(&args)
}

fn sh_args(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The test network.
pub struct TestNet {
    switch: Option<String>,
    hosts: Vec<String>,
    /// The threads carrying delayed links ([`TestNet::delay`]), and what stops them.
    cables: Vec<std::thread::JoinHandle<()>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A name prefix no other network of this process (or a concurrent one) uses.
fn prefix() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "qt{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

impl TestNet {
    /// One host with only loopback: no route anywhere.
    pub fn isolated() -> anyhow::Result<Self> {
        let ns = format!("{}-h1", prefix());
        sh(&format!("ip netns add {ns}"))?;
        let net = Self {
            switch: None,
            hosts: vec![ns.clone()],
            cables: Vec::new(),
            stop: Default::default(),
        };
        sh(&format!("ip -n {ns} link set lo up"))?;
        Ok(net)
    }

    /// A switch and `n` hosts, `h1`..`hn` at 10.99.0.1..n.
    pub fn new(n: usize) -> anyhow::Result<Self> {
        let prefix = prefix();
        let switch = format!("{prefix}-sw");
        sh(&format!("ip netns add {switch}"))?;
        let mut net = Self {
            switch: Some(switch.clone()),
            hosts: vec![],
            cables: Vec::new(),
            stop: Default::default(),
        };
        sh(&format!("ip -n {switch} link add br0 type bridge"))?;
        sh(&format!("ip -n {switch} link set br0 up"))?;
        for i in 1..=n {
            let ns = format!("{prefix}-h{i}");
            sh(&format!("ip netns add {ns}"))?;
            net.hosts.push(ns.clone());
            sh(&format!(
                "ip link add eth0 netns {ns} type veth peer name p{i} netns {switch}"
            ))?;
            sh(&format!("ip -n {switch} link set p{i} master br0"))?;
            sh(&format!("ip -n {switch} link set p{i} up"))?;
            sh(&format!("ip -n {ns} addr add 10.99.0.{i}/24 dev eth0"))?;
            sh(&format!("ip -n {ns} link set eth0 up"))?;
            sh(&format!("ip -n {ns} link set lo up"))?;
        }
        Ok(net)
    }

    /// Puts a host behind host `i`, which becomes its NAT router: the new host (its namespace
    /// is returned) is 192.168.`i`.2 on a link of its own to `i`, its default route through
    /// `i`, whose nftables masquerade what it forwards to the bridge. `random`: a new random
    /// port per destination, as symmetric NATs do (else the port is kept, as endpoint-
    /// independent NATs do). Nothing from the bridge reaches the new host unless it answers
    /// what it sent.
    pub fn behind_nat(&mut self, i: usize, random: bool) -> anyhow::Result<String> {
        let router = self.ns(i).to_owned();
        let inner = format!("{router}-in");
        sh(&format!("ip netns add {inner}"))?;
        self.hosts.push(inner.clone());
        sh(&format!(
            "ip link add eth0 netns {inner} type veth peer name lan0 netns {router}"
        ))?;
        sh(&format!(
            "ip -n {router} addr add 192.168.{i}.1/24 dev lan0"
        ))?;
        sh(&format!("ip -n {router} link set lan0 up"))?;
        sh(&format!("ip -n {inner} addr add 192.168.{i}.2/24 dev eth0"))?;
        sh(&format!("ip -n {inner} link set eth0 up"))?;
        sh(&format!("ip -n {inner} link set lo up"))?;
        sh(&format!(
            "ip -n {inner} route add default via 192.168.{i}.1"
        ))?;
        sh(&format!(
            "ip netns exec {router} sysctl -q -w net.ipv4.ip_forward=1"
        ))?;
        sh(&format!("ip netns exec {router} nft add table ip qtnat"))?;
        sh_args(&[
            "ip",
            "netns",
            "exec",
            &router,
            "nft",
            "add",
            "chain",
            "ip",
            "qtnat",
            "post",
            "{ type nat hook postrouting priority 100 ; }",
        ])?;
        let how = if random {
            "masquerade random"
        } else {
            "masquerade"
        };
        sh(&format!(
            "ip netns exec {router} nft add rule ip qtnat post oifname eth0 {how}"
        ))?;
        // As a home router's firewall does: what arrives unasked is dropped before it is
        // tracked (else it would take the tuple its host's own mapping needs).
        for hook in ["input", "forward"] {
            let chain = format!("{{ type filter hook {hook} priority 0 ; }}");
            sh_args(&[
                "ip", "netns", "exec", &router, "nft", "add", "chain", "ip", "qtnat", hook, &chain,
            ])?;
            sh(&format!(
                "ip netns exec {router} nft add rule ip qtnat {hook} iifname eth0 ct state new drop"
            ))?;
        }
        Ok(inner)
    }

    /// The namespace of host `i` (1-based).
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i - 1]
    }

    /// The namespace of the switch every host's link ends in (none for an isolated host).
    pub fn switch(&self) -> Option<&str> {
        self.switch.as_deref()
    }

    /// The address of host `i`.
    pub fn ip(&self, i: usize) -> String {
        format!("10.99.0.{i}")
    }

    /// Limits what host `i` sends to `rate` (tc syntax, e.g. "20mbit").
    pub fn limit(&self, i: usize, rate: &str) -> anyhow::Result<()> {
        self.shape(i, rate, "64kb")
    }

    /// Limits what host `i` sends to `rate`, with a token bucket of `burst` (tc syntax).
    pub fn shape(&self, i: usize, rate: &str, burst: &str) -> anyhow::Result<()> {
        sh(&format!(
            "ip netns exec {} tc qdisc replace dev eth0 root tbf rate {rate} burst {burst} latency 50ms",
            self.ns(i)
        ))
    }

    /// Limits what host `i` receives to `rate`, with a token bucket of `burst`: the switch's port
    /// toward it is shaped.
    pub fn shape_in(&self, i: usize, rate: &str, burst: &str) -> anyhow::Result<()> {
        let switch = self
            .switch
            .as_deref()
            .context("an isolated host has no link")?;
        sh(&format!(
            "ip netns exec {switch} tc qdisc replace dev p{i} root tbf rate {rate} burst {burst} latency 50ms"
        ))
    }

    /// Drops `percent`% of the UDP datagrams host `i` sends, at random, one by one (offloads off
    /// so that a drop is one packet, not a batch).
    pub fn loss(&self, i: usize, percent: u32) -> anyhow::Result<()> {
        let ns = self.ns(i);
        sh(&format!(
            "ip netns exec {ns} ethtool -K eth0 gso off gro off tso off"
        ))?;
        sh(&format!("ip netns exec {ns} nft add table inet qtloss"))?;
        sh_args(&[
            "ip",
            "netns",
            "exec",
            ns,
            "nft",
            "add",
            "chain",
            "inet",
            "qtloss",
            "out",
            "{ type filter hook output priority 0 ; }",
        ])?;
        sh(&format!(
            "ip netns exec {ns} nft add rule inet qtloss out meta l4proto udp numgen random mod 100 < {percent} drop"
        ))
    }

    /// Cuts (`up = false`) or restores host `i`'s link.
    pub fn link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        let switch = self
            .switch
            .as_deref()
            .context("an isolated host has no link")?;
        sh(&format!("ip -n {switch} link set p{i} {state}"))
            .with_context(|| format!("setting {}'s link {state}", self.ns(i)))
    }
}

impl TestNet {
    /// Host `i`'s kernel forwards UDP sent to its `port` on to the same port of host `to`
    /// (nftables DNAT, and masquerade so that the answers come back through `i`).
    pub fn forward_udp(&self, i: usize, port: u16, to: usize) -> anyhow::Result<()> {
        let ns = self.ns(i);
        let to = self.ip(to);
        sh(&format!(
            "ip netns exec {ns} sysctl -q -w net.ipv4.ip_forward=1"
        ))?;
        sh(&format!("ip netns exec {ns} nft add table ip qtfwd"))?;
        for (chain, hook, priority) in [("pre", "prerouting", -100), ("post", "postrouting", 100)] {
            let spec = format!("{{ type nat hook {hook} priority {priority} ; }}");
            sh_args(&[
                "ip", "netns", "exec", ns, "nft", "add", "chain", "ip", "qtfwd", chain, &spec,
            ])?;
        }
        sh(&format!(
            "ip netns exec {ns} nft add rule ip qtfwd pre udp dport {port} dnat to {to}:{port}"
        ))?;
        sh(&format!(
            "ip netns exec {ns} nft add rule ip qtfwd post ip daddr {to} udp dport {port} masquerade"
        ))
    }

    /// Delays every frame crossing host `i`'s link by `one_way`, each way (tc here has no
    /// netem): the switch's port toward it leaves the bridge, and this process carries frames
    /// between it and a new port on the bridge, each held for `one_way`. Shaping set with
    /// [`TestNet::shape_in`] still applies (frames are sent through the port's qdisc).
    /// Offloads are turned off on the way so that a frame is one packet, checksums included.
    pub fn delay(&mut self, i: usize, one_way: std::time::Duration) -> anyhow::Result<()> {
        let switch = self
            .switch
            .clone()
            .context("an isolated host has no link")?;
        let host = self.ns(i).to_owned();
        sh(&format!("ip -n {switch} link set p{i} nomaster"))?;
        sh(&format!(
            "ip -n {switch} link add d{i} type veth peer name e{i}"
        ))?;
        sh(&format!("ip -n {switch} link set e{i} master br0"))?;
        for dev in [format!("d{i}"), format!("e{i}")] {
            sh(&format!("ip -n {switch} link set {dev} up"))?;
        }
        let devs = [
            (&host, "eth0".to_owned()),
            (&switch, format!("p{i}")),
            (&switch, format!("d{i}")),
            (&switch, format!("e{i}")),
        ];
        for (ns, dev) in devs {
            for feature in ["gso", "gro", "tso", "tx-udp-segmentation", "tx"] {
                // One at a time: a device that cannot change one still changes the others.
                let _ = sh(&format!(
                    "ip netns exec {ns} ethtool -K {dev} {feature} off"
                ));
            }
        }
        // A frame carried must hold its checksums: every host computes them as it sends
        // (a veth otherwise leaves them to its peer).
        for ns in &self.hosts {
            let _ = sh(&format!("ip netns exec {ns} ethtool -K eth0 tx off"));
        }
        let (port, new) = cable::open(&switch, &format!("p{i}"), &format!("d{i}"))?;
        let (port, new) = (std::sync::Arc::new(port), std::sync::Arc::new(new));
        for (from, to) in [(port.clone(), new.clone()), (new, port)] {
            let threads = cable::carry(from, to, one_way, self.stop.clone());
            self.cables.extend(threads);
        }
        Ok(())
    }
}

/// Moves the calling thread (only it) into namespace `ns`: sockets it makes from then on are
/// that namespace's.
pub fn enter(ns: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
    // SAFETY: setns on an open namespace file; it moves only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// A link's frames carried through this process, delayed: packet sockets on two ports.
mod cable {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use anyhow::Context;

    /// Not in every libc crate version: frames we send are not read back.
    const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

    /// Packet sockets on `a` and `b`, two devices of namespace `ns` (opened on a thread moved
    /// into it; a socket stays in the namespace it was made in).
    pub(super) fn open(ns: &str, a: &str, b: &str) -> anyhow::Result<(OwnedFd, OwnedFd)> {
        let (ns, a, b) = (ns.to_owned(), a.to_owned(), b.to_owned());
        let opened = std::thread::spawn(move || -> anyhow::Result<(OwnedFd, OwnedFd)> {
            super::enter(&ns)?;
            Ok((socket(&a)?, socket(&b)?))
        });
        opened
            .join()
            .map_err(|_| anyhow::anyhow!("the cable's setup thread panicked"))?
    }

    fn socket(dev: &str) -> anyhow::Result<OwnedFd> {
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: a plain socket call; the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("packet socket");
        }
        // SAFETY: fd is a new descriptor no one else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(dev)?;
        // SAFETY: name is a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(index != 0, "no device {dev}");
        // SAFETY: sockaddr_ll is plain data; zero is a valid value for every field.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = index as i32;
        // SAFETY: addr is a sockaddr_ll of the size given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if bound != 0 {
            return Err(std::io::Error::last_os_error()).context("binding a packet socket");
        }
        let one: libc::c_int = 1;
        let buffer: libc::c_int = 8 << 20;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        set(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &one)?;
        set(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &buffer)?;
        set(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
        Ok(fd)
    }

    fn set<T>(
        fd: &OwnedFd,
        level: libc::c_int,
        name: libc::c_int,
        value: &T,
    ) -> anyhow::Result<()> {
        // SAFETY: value points to a T of the size given.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (value as *const T).cast(),
                size_of::<T>() as u32,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).context("setsockopt");
        }
        Ok(())
    }

    /// Frames read on `from` are sent on `to` `delay` later, in order, until `stop`: one thread
    /// reads, one sends.
    pub(super) fn carry(
        from: Arc<OwnedFd>,
        to: Arc<OwnedFd>,
        delay: Duration,
        stop: Arc<AtomicBool>,
    ) -> [std::thread::JoinHandle<()>; 2] {
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
        let stop_reading = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while !stop_reading.load(Ordering::Relaxed) {
                // SAFETY: buf is writable for its length.
                let n =
                    unsafe { libc::recv(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                let Ok(n) = usize::try_from(n) else { continue };
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        });
        let sender = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((at, frame)) = rx.recv_timeout(Duration::from_millis(100)) else {
                    continue;
                };
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                // SAFETY: frame is readable for its length. A frame the qdisc drops is lost,
                // as on a wire.
                unsafe { libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            }
        });
        [reader, sender]
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for cable in self.cables.drain(..) {
            let _ = cable.join();
        }
        for ns in self.hosts.iter().chain(self.switch.as_ref()) {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}
