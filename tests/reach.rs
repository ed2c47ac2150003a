//! Reach: a running `serve` or `sync` takes in edits to `peer_settings.txt` and `certs/` without
//! a restart. Each peer that must see the files differently has a root of its own
//! (`Net::apart`), as on separate machines.

mod util;

use std::io::Write;
use std::time::{Duration, Instant};

use util::{Net, TestResult, poll};

const WAIT: Duration = Duration::from_secs(15);

/// p3 is not in p1's table: its handshake is refused. Once the line is added, p1's running
/// server lists its files to p3 within seconds, and says it took p3 in.
#[test]
fn a_peer_added_while_serving_is_served_within_seconds() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    net.put("p1", "a.txt", b"hello")?;
    let p3 = net.apart("p3")?;
    net.list_only(&["p1", "p2"], "")?;
    let s1 = net.serve("p1", &[])?;
    let refused = p3.run("p3", &["list", "p1"])?;
    assert!(!refused.success(), "{refused}");
    let added = Instant::now();
    net.list_only(&["p1", "p2", "p3"], "")?;
    poll(WAIT, || {
        Ok(p3.run("p3", &["list", "p1"])?.success().then_some(()))
    })?;
    let _ = writeln!(
        std::io::stderr(),
        "p3 served {:.2} s after it was added",
        added.elapsed().as_secs_f64()
    );
    s1.wait_for_log("p3 added at 127.0.0.1:", WAIT)?;
    Ok(())
}

/// p2 is downloading from p1 (held to 256 KiB/s) when it is removed from p1's table: p1 closes
/// its connection at once, and refuses it from then on; p3 is still served.
#[test]
fn a_removed_peer_is_disconnected_and_refused() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    let p2 = net.apart("p2")?;
    let data = util::random_bytes(4 << 20, 71);
    net.put("p1", "big.bin", &data)?;
    let s1 = net.serve("p1", &["--max-upload-rate", "256K"])?;
    let download = p2.spawn("p2", &["download", "big.bin", "p1"])?;
    s1.wait_for_log("read_chunk big.bin", WAIT)?;
    let removed = Instant::now();
    net.list_only(&["p1", "p3"], "")?;
    let out = util::Out::of(download)?;
    assert!(!out.success(), "the download ended early: {out}");
    assert!(removed.elapsed() < Duration::from_secs(12), "{out}");
    s1.wait_for_log("closing its connection: no longer listed", WAIT)?;
    assert!(!p2.run("p2", &["list", "p1"])?.success());
    net.ok("p3", &["list", "p1"])?;
    assert!(!p2.served("p2").join("big.bin").exists());
    Ok(())
}

/// A malformed line is said once and changes nothing: p2 is still served; the next good edit
/// is taken in.
#[test]
fn a_malformed_edit_keeps_the_last_good_table() -> TestResult {
    let net = Net::new(&["p1", "p2", "p3"])?;
    let p2 = net.apart("p2")?;
    let s1 = net.serve("p1", &[])?;
    net.list_only(&["p1"], "p2 127.0.0.1 not-a-port\n")?;
    s1.wait_for_log("the last good peer table stays in force", WAIT)?;
    p2.ok("p2", &["list", "p1"])?;
    std::thread::sleep(Duration::from_secs(2));
    let said = s1.log().matches("stays in force").count();
    assert_eq!(said, 1, "said once: {}", s1.log());
    net.list_only(&["p1", "p3"], "")?;
    s1.wait_for_log("p2 removed", WAIT)?;
    assert!(!p2.run("p2", &["list", "p1"])?.success());
    Ok(())
}

/// p2 makes a new key pair; its new certificate is copied into p1's `certs/`: p1 closes the
/// connection p2 had with the old key and refuses that key, and accepts the new one.
#[test]
fn a_replaced_certificate_takes_effect_and_the_old_one_is_refused() -> TestResult {
    let net = Net::new(&["p1", "p2"])?;
    net.put("p1", "a.txt", b"hello")?;
    let s1 = net.serve("p1", &[])?;
    let new_p2 = net.apart("p2")?;
    std::fs::remove_file(new_p2.root().join("p2").join("identity.key"))?;
    std::fs::remove_file(new_p2.root().join("p2").join("identity.pem"))?;
    std::fs::remove_file(new_p2.root().join("certs").join("p2.pem"))?;
    new_p2.ok("p2", &["init"])?;
    net.ok("p2", &["list", "p1"])?;
    assert!(!new_p2.run("p2", &["list", "p1"])?.success());
    // Installed as a copy would be: written beside, renamed into place.
    let pem = std::fs::read(new_p2.root().join("certs").join("p2.pem"))?;
    let at = net.root().join("certs").join("p2.pem");
    std::fs::write(at.with_extension("new"), pem)?;
    std::fs::rename(at.with_extension("new"), &at)?;
    s1.wait_for_log("p2 has a new certificate", WAIT)?;
    poll(WAIT, || {
        Ok(new_p2.run("p2", &["list", "p1"])?.success().then_some(()))
    })?;
    assert!(!net.run("p2", &["list", "p1"])?.success());
    Ok(())
}

/// p2 moves to another port while both sync a folder: once p1's table says where, p1 dials
/// the new address, and a change made on p2 there reaches p1.
#[test]
fn a_peer_readdressed_while_syncing_is_dialled_at_its_new_address() -> TestResult {
    let net = Net::new(&["p1", "p2", "p9"])?;
    for id in ["p1", "p2"] {
        std::fs::create_dir_all(net.served(id).join("notes"))?;
    }
    // p9 is never run: its port is where p2 moves.
    let port9 = net.peers.iter().find(|(p, _)| p == "p9").unwrap().1;
    let p2 = net.apart("p2")?;
    let args = ["sync", "--folder", "notes", "--rescan", "5"];
    let _s1 = net.start("p1", &args)?;
    let new_addr = format!("127.0.0.1:{port9}");
    let mut moved = args.to_vec();
    moved.extend(["--listen", new_addr.as_str()]);
    let _s2 = p2.start("p2", &moved)?;
    std::fs::write(p2.served("p2").join("notes").join("from-p2.txt"), "moved")?;
    let at = net.served("p1").join("notes").join("from-p2.txt");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!at.exists(), "p1 cannot know where p2 is yet");
    let port1 = net.peers.iter().find(|(p, _)| p == "p1").unwrap().1;
    let table = format!("p1 127.0.0.1 {port1}\np2 127.0.0.1 {port9}\n");
    let path = net.root().join("peer_settings.txt");
    std::fs::write(path.with_extension("new"), table)?;
    std::fs::rename(path.with_extension("new"), path)?;
    poll(WAIT, || Ok(at.exists().then_some(())))?;
    assert_eq!(std::fs::read(&at)?, b"moved");
    Ok(())
}

/// Peers listed as `auto`, on hosts of a bridge (namespaces): found by mDNS. An impostor
/// announcing itself as p2 with another certificate is not dialled (the download names the
/// refusal) and `discover` marks it; once the real p2 announces, p1 downloads from it.
#[test]
fn peers_listed_as_auto_are_found_on_the_lan_and_an_impostor_is_refused() -> TestResult {
    use util::netns::{self, TestNet};
    if !netns::available("peers_listed_as_auto_are_found_on_the_lan_and_an_impostor_is_refused") {
        return Ok(());
    }
    let tn = TestNet::new(3)?;
    let net = Net::on_hosts(&["p1", "p2", "p3"], &tn)?;
    std::fs::write(
        net.root().join("peer_settings.txt"),
        "p1 auto\np2 auto\np3 auto\n",
    )?;
    net.put("p2", "a.txt", b"from the real p2")?;
    // The impostor: p2's name, a key pair of its own, on host 3.
    let impostor = net.apart("p2")?.on_host("p2", tn.ns(3));
    std::fs::remove_file(impostor.root().join("p2").join("identity.key"))?;
    std::fs::remove_file(impostor.root().join("p2").join("identity.pem"))?;
    std::fs::remove_file(impostor.root().join("certs").join("p2.pem"))?;
    impostor.ok("p2", &["init"])?;
    std::fs::write(impostor.served("p2").join("a.txt"), b"from the impostor")?;
    let _fake = impostor.serve("p2", &[])?;
    let refused = net.fails("p1", &["download", "a.txt", "p2"])?;
    assert!(
        refused.stderr().contains("only with another certificate"),
        "{refused}"
    );
    let heard = net.json("p1", &["discover", "--json", "--wait", "2"])?;
    let p2 = (heard["peers"].as_array().unwrap().iter())
        .find(|p| p["peer"] == "p2")
        .cloned()
        .unwrap_or_default();
    assert_eq!(p2["standing"], "other certificate", "{heard}");
    let _real = net.serve("p2", &[])?;
    net.ok("p1", &["download", "a.txt", "p2"])?;
    assert_eq!(
        std::fs::read(net.served("p1").join("a.txt"))?,
        b"from the real p2"
    );
    let heard = net.json("p1", &["discover", "--json", "--wait", "2"])?;
    let standings: Vec<String> = (heard["peers"].as_array().unwrap().iter())
        .map(|p| format!("{} {}", p["peer"], p["standing"]))
        .collect();
    assert!(
        standings.contains(&"\"p2\" \"listed\"".to_owned()),
        "{heard}"
    );
    Ok(())
}

/// p4 and p5 are each behind a NAT router (nftables masquerade, ports kept: an
/// endpoint-independent mapping) and listed as `auto`; p1 is on the bridge. p5's server keeps a
/// connection to p1; p4 asks p1 to introduce it, p5 opens its NAT toward p4, and p4 downloads
/// from p5 directly through both NATs.
#[test]
fn peers_behind_nats_are_introduced_and_punch_through() -> TestResult {
    use util::netns;
    if !netns::available("peers_behind_nats_are_introduced_and_punch_through") {
        return Ok(());
    }
    let (tn, net, data) = behind_nats(false, 81)?;
    let s1 = net.serve("p1", &[])?;
    let s5 = net.serve("p5", &[])?;
    s5.wait_for_log("p1 can introduce others to us", WAIT)?;
    // p4 cannot reach p5 but through an introduction: no address, no LAN in common.
    let started = Instant::now();
    let json = match net.json("p4", &["download", "f.bin", "p5", "--json"]) {
        Ok(json) => json,
        Err(e) => anyhow::bail!("{e}\np1:\n{}\np5:\n{}", s1.log(), s5.log()),
    };
    assert_eq!(
        std::fs::read(net.served("p4").join("f.bin"))?,
        data,
        "{json}"
    );
    assert_eq!(util::share(&json, "p5"), data.len() as u64, "{json}");
    assert_eq!(json["routes"]["p5"], "punched (introduced by p1)", "{json}");
    let listed = net.json("p4", &["list", "p5", "--json"])?;
    assert_eq!(
        listed["peers"][0]["route"], "punched (introduced by p1)",
        "{listed}"
    );
    s1.wait_for_log("introduce p4 to p5", WAIT)?;
    s5.wait_for_log("p1 introduces p4", WAIT)?;
    s5.wait_for_log("punched (introduced by p1)", WAIT)?;
    // p1 moved in the table: p5 closes the connection it kept to p1's old address.
    std::fs::write(
        net.root().join("peer_settings.txt"),
        format!("p1 {} 47001\np4 auto\np5 auto\n", tn.ip(1)),
    )?;
    s5.wait_for_log("p1 is no longer listed so", WAIT)?;
    let _ = writeln!(
        std::io::stderr(),
        "punched through two NATs: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// p5 is listed at its router's address (ip and port, no port forwarded): the router lets
/// nothing in unasked. p5's server, on an address its host does not have, listens on any and
/// keeps a connection to p1; p4's dial to the listed address gets no answer, so after a moment
/// it asks p1, and the download goes through the NATs punched.
#[test]
fn a_peer_unreachable_at_its_listed_address_is_introduced() -> TestResult {
    use util::netns;
    if !netns::available("a_peer_unreachable_at_its_listed_address_is_introduced") {
        return Ok(());
    }
    let (tn, net, data) = behind_nats(false, 84)?;
    std::fs::write(
        net.root().join("peer_settings.txt"),
        format!("p1 {} 47000\np4 auto\np5 {} 47000\n", tn.ip(1), tn.ip(3)),
    )?;
    let s1 = net.serve("p1", &[])?;
    let s5 = net.serve("p5", &[])?;
    s5.wait_for_log("is not an address of this host", WAIT)?;
    s5.wait_for_log("p1 can introduce others to us", WAIT)?;
    let json = match net.json("p4", &["download", "f.bin", "p5", "--json"]) {
        Ok(json) => json,
        Err(e) => anyhow::bail!("{e}\np1:\n{}\np5:\n{}", s1.log(), s5.log()),
    };
    assert_eq!(std::fs::read(net.served("p4").join("f.bin"))?, data);
    assert_eq!(json["routes"]["p5"], "punched (introduced by p1)", "{json}");
    s1.wait_for_log("introduce p4 to p5", WAIT)?;
    s5.wait_for_log("punched (introduced by p1)", WAIT)?;
    // p1, listed at its own address, is dialled there as ever: no introduction asked.
    net.put("p1", "g.bin", b"direct")?;
    let json = net.json("p4", &["download", "g.bin", "p1", "--json"])?;
    assert!(json["routes"].get("p1").is_none(), "{json}");
    Ok(())
}

/// Both behind NATs that map each destination to a new port (`masquerade random`, as symmetric
/// NATs do): the punched address gets no answer, and p1 relays. Its limits hold: paced to
/// 512 KiB/s (1 MiB takes at least 1.5 s through it), and with `--max-relayed 1` a second relay
/// while the first runs is refused by name.
#[test]
fn peers_behind_symmetric_nats_are_relayed_within_its_limits() -> TestResult {
    use util::netns;
    if !netns::available("peers_behind_symmetric_nats_are_relayed_within_its_limits") {
        return Ok(());
    }
    let (_tn, net, data) = behind_nats(true, 82)?;
    net.put("p5", "g.bin", b"second")?;
    let s1 = net.serve("p1", &["--relay-rate", "512K", "--max-relayed", "1"])?;
    let s5 = net.serve("p5", &[])?;
    s5.wait_for_log("p1 can introduce others to us", WAIT)?;
    let started = Instant::now();
    let json = match net.json("p4", &["download", "f.bin", "p5", "--json"]) {
        Ok(json) => json,
        Err(e) => anyhow::bail!("{e}\np1:\n{}\np5:\n{}", s1.log(), s5.log()),
    };
    let took = started.elapsed();
    assert_eq!(std::fs::read(net.served("p4").join("f.bin"))?, data);
    assert_eq!(json["routes"]["p5"], "relayed by p1", "{json}");
    assert!(took > Duration::from_millis(1500), "paced: {took:?}");
    s1.wait_for_log("relay p4 to p5 through", WAIT)?;
    s5.wait_for_log("connected: qnode/3, compression auto, relayed by p1", WAIT)?;
    // The first relay is still there (until idle): a second is refused, and said so.
    let refused = net.fails("p4", &["download", "g.bin", "p5"])?;
    assert!(
        refused.stderr().contains("relays 1 peers already"),
        "{refused}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "relayed through p1 at 512 KiB/s: 1 MiB in {:.2} s",
        took.as_secs_f64()
    );
    Ok(())
}

/// An introducer that lies: the fake p1 (in host 1's namespace) gives p3's address for p5.
/// p4 dials it with p5's pinned certificate, and the handshake refuses the impostor: nothing is
/// downloaded, and the error says whose certificate did not match.
#[test]
fn an_introducer_that_lies_about_an_address_is_refused_by_the_pin() -> TestResult {
    use util::netns::{self, TestNet};
    if !netns::available("an_introducer_that_lies_about_an_address_is_refused_by_the_pin") {
        return Ok(());
    }
    let tn = TestNet::new(4)?;
    let net = Net::on_hosts(&["p1", "p4", "p3", "p5"], &tn)?;
    let (ip1, ip3) = (tn.ip(1), tn.ip(3));
    std::fs::write(
        net.root().join("peer_settings.txt"),
        format!("p1 {ip1} 47000\np3 {ip3} 47000\np4 auto\np5 auto\n"),
    )?;
    net.put("p3", "f.bin", b"the impostor's")?;
    let _s3 = net.serve("p3", &[])?;
    let liar: std::net::SocketAddr = format!("{ip3}:47000").parse()?;
    let at: std::net::SocketAddr = format!("{ip1}:47000").parse()?;
    let ns = tn.ns(1).to_owned();
    let root = net.root().to_owned();
    let (ready, up) = std::sync::mpsc::channel();
    // The fake introducer runs on a thread moved into host 1's namespace.
    std::thread::spawn(move || {
        if netns::enter(&ns).is_err() {
            return;
        }
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let fake = util::peer::fake_peer_at(&root, "p1", "p4", at, move |req, mut send| {
                Box::pin(async move {
                    let answer = match req {
                        qnode::wire::protocol::Request::Introduce { .. } => {
                            qnode::wire::protocol::Response::Introduced { addr: liar }
                        }
                        _ => return util::peer::not_found(&mut send).await,
                    };
                    qnode::wire::exchange::respond(&mut send, &answer).await;
                })
            });
            let _ = ready.send(fake.is_ok());
            if let Ok(fake) = fake {
                let _ = fake.await;
            }
        });
    });
    anyhow::ensure!(up.recv_timeout(WAIT)?, "the fake introducer did not start");
    let refused = net.fails("p4", &["download", "f.bin", "p5"])?;
    assert!(
        refused.stderr().contains("does not match certs/p5.pem"),
        "{refused}"
    );
    assert!(!net.served("p4").join("f.bin").exists());
    Ok(())
}

/// p1 on the bridge; p4 and p5 each behind a NAT router of their own (`symmetric`: a random
/// port per destination), listed as `auto`; p5 holding `f.bin`, 1 MiB of `seed`.
fn behind_nats(symmetric: bool, seed: u64) -> anyhow::Result<(util::netns::TestNet, Net, Vec<u8>)> {
    let mut tn = util::netns::TestNet::new(3)?;
    let behind4 = tn.behind_nat(2, symmetric)?;
    let behind5 = tn.behind_nat(3, symmetric)?;
    let net = Net::on_hosts(&["p1", "p4", "p5"], &tn)?
        .on_host("p4", &behind4)
        .on_host("p5", &behind5);
    std::fs::write(
        net.root().join("peer_settings.txt"),
        format!("p1 {} 47000\np4 auto\np5 auto\n", tn.ip(1)),
    )?;
    let data = util::random_bytes(1 << 20, seed);
    net.put("p5", "f.bin", &data)?;
    Ok((tn, net, data))
}

/// A relayed download survives its introducer's restart: p1 (the relay, held to 128 KiB/s) is
/// killed a few seconds in and started again; p5 reconnects to it, and p4's download gives up
/// its connection through the old relay once its own connection to p1 is reset (p1's restart
/// answers its next keep-alive so), asks p1 for a new relay and finishes whole.
#[test]
fn a_relayed_download_survives_the_introducers_restart() -> TestResult {
    use util::netns;
    if !netns::available("a_relayed_download_survives_the_introducers_restart") {
        return Ok(());
    }
    let (_tn, net, _) = behind_nats(true, 83)?;
    let data = util::random_bytes(2 << 20, 84);
    net.put("p5", "big.bin", &data)?;
    let slow = ["--relay-rate", "128K"];
    let mut s1 = net.serve("p1", &slow)?;
    let s5 = net.serve("p5", &[])?;
    s5.wait_for_log("p1 can introduce others to us", WAIT)?;
    let args = ["download", "big.bin", "p5", "--json"];
    let child = (net.cmd("p4", &args).env("RUST_LOG", "info"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let download = ("p4 download big.bin p5 --json".to_owned(), child);
    s1.wait_for_log("relay p4 to p5 through", WAIT)?;
    std::thread::sleep(Duration::from_secs(3));
    s1.kill();
    let s1 = net.serve("p1", &slow)?;
    let out = util::Out::of(download)?;
    assert!(out.success(), "{out}\np1:\n{}\np5:\n{}", s1.log(), s5.log());
    assert_eq!(std::fs::read(net.served("p4").join("big.bin"))?, data);
    assert!(s1.log().contains("relay p4 to p5 through"), "{}", s1.log());
    // Given up as soon as its connection to p1 was reset, not at the idle timeout.
    assert!(
        out.stderr()
            .contains("p5: the connection to p1 closed, and its relay with it"),
        "{out}"
    );
    Ok(())
}
