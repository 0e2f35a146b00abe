//! TLS channels, qmig to qmig over tcp loopback, through the library: a stream and
//! the return path on one session from different threads, cancel that never
//! hangs, and each refusal with the one-line cause on both ends; then the CLI:
//! `qmig send` -> `qmig recv` over TLS with the return path and an authz file, a
//! refused source that leaves the destination file untouched, and `qmig demo`.

mod common;

use common::{assert_same_ram, one_line_error, run_qmig, utf8, BackgroundQmig, TestDir};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use testkit::tls::{good_dir, write_dir, Ca, Validity, CLIENT_DN, SERVER_NAMES};
use transports::{
    CancelToken, Channel, Listener, MigrationReader, MigrationUri, MigrationWriter, RateLimit, TlsAuthz, TlsParams,
    TransportError,
};

/// Generous: a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(30);

fn loopback() -> MigrationUri {
    "tcp:127.0.0.1:0".parse().unwrap()
}

/// A TLS listener on loopback with `server`'s parameters, accepting one connection in a thread.
fn serve(
    server: &TlsParams,
    cancel: &CancelToken,
) -> (MigrationUri, thread::JoinHandle<Result<Channel, TransportError>>) {
    let creds = server.server().expect("server credentials");
    let l = Listener::bind(&loopback(), cancel).unwrap().with_tls(creds).unwrap();
    let uri = l.local_uri().clone();
    (uri, thread::spawn(move || l.accept()))
}

fn pattern(len: usize) -> Vec<u8> {
    let mut rng = testkit::SplitMix64::new(7);
    (0..len / 8).flat_map(|_| rng.next_u64().to_le_bytes()).collect()
}

#[test]
fn stream_and_return_path_share_one_session() {
    let dir = TestDir::new("tls-session");
    let creds = dir.join("creds");
    good_dir(&creds).unwrap();
    let mut server = TlsParams::new(&creds);
    server.authz = Some(TlsAuthz::new([CLIENT_DN.to_string()]));
    let (cs, cc) = (CancelToken::new().unwrap(), CancelToken::new().unwrap());
    let (uri, accepted) = serve(&server, &cs);
    let client = TlsParams::new(&creds).connect(&uri, &cc).expect("client handshake");
    let server_ch = accepted.join().unwrap().expect("server handshake");
    assert!(client.is_tls() && server_ch.is_tls());
    assert_eq!(server_ch.tls_protocol().as_deref(), Some("TLSv1_3"));
    assert_eq!(server_ch.tls_peer_dn().as_deref(), Some(CLIENT_DN));
    assert_eq!(client.tls_peer_dn().as_deref(), Some("O=qmig test,CN=qmig-destination"));

    // The source writes 8 MiB (buffered and borrowed writes) while the destination
    // answers on the return path from another thread and the source reads it.
    let data = pattern(8 << 20);
    let server_rp = server_ch.return_path().unwrap();
    let client_rp = client.return_path().unwrap();
    let replies = thread::spawn(move || {
        for i in 0u32..2000 {
            (&server_rp).write_all(&i.to_be_bytes()).unwrap();
        }
        server_rp
    });
    let reader = thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < 8000 {
            let n = client_rp.read(&mut buf).unwrap();
            assert!(n > 0, "return path ended early");
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    let received = thread::spawn(move || {
        let mut r = MigrationReader::new(server_ch, RateLimit::new(0));
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut all).unwrap();
        all
    });
    let mut w = MigrationWriter::new(client, RateLimit::new(0));
    for chunk in data.chunks(1 << 20) {
        w.write_all(&chunk[..100]).unwrap();
        w.write_borrowed(&chunk[100..]).unwrap();
    }
    let client = w.finish().map_err(|(_, e)| e).unwrap();
    let got = received.join().unwrap();
    assert!(got == data, "the stream arrived altered ({} of {} bytes)", got.len(), data.len());
    let rp = reader.join().unwrap();
    let expect: Vec<u8> = (0u32..2000).flat_map(u32::to_be_bytes).collect();
    assert_eq!(rp, expect, "return path messages");
    drop(replies.join().unwrap());
    drop(client);
}

#[test]
fn cancel_wakes_blocked_readers_and_writers() {
    let dir = TestDir::new("tls-cancel");
    let creds = dir.join("creds");
    good_dir(&creds).unwrap();
    // One token for both ends: cancelled once, every blocked call must say so (with
    // two tokens, the end cancelled second would first see its peer close).
    let cs = CancelToken::new().unwrap();
    let cc = cs.clone();
    let pair = || {
        let (uri, accepted) = serve(&TlsParams::new(&creds), &cs);
        let client = TlsParams::new(&creds).connect(&uri, &cc).unwrap();
        (client, accepted.join().unwrap().unwrap())
    };
    // Session A: nothing is sent, so the destination's stream reader and both
    // return-path readers block. Session B: the destination never reads, so the
    // source's writer blocks on a full socket.
    let (a_client, a_server) = pair();
    let (b_client, b_server) = pair();
    let (tx, rx) = mpsc::channel::<(&str, std::io::Result<usize>)>();
    let mut threads = Vec::new();
    let server_rp = a_server.return_path().unwrap();
    let client_rp = a_client.return_path().unwrap();
    let t = tx.clone();
    threads.push(thread::spawn(move || t.send(("server stream", a_server.read(&mut [0u8; 16]))).unwrap()));
    let t = tx.clone();
    threads.push(thread::spawn(move || t.send(("server return path", server_rp.read(&mut [0u8; 16]))).unwrap()));
    let t = tx.clone();
    threads.push(thread::spawn(move || t.send(("client return path", client_rp.read(&mut [0u8; 16]))).unwrap()));
    let t = tx;
    threads.push(thread::spawn(move || {
        let mut w = MigrationWriter::new(b_client, RateLimit::new(0));
        let block = vec![0x5au8; 1 << 20];
        let r = (|| {
            for _ in 0..1024 {
                w.write_all(&block)?;
            }
            w.flush()?;
            Ok(0)
        })();
        t.send(("client writer", r)).unwrap();
    }));
    // Let everyone block (the writer fills the socket buffers within a few hundred ms).
    thread::sleep(Duration::from_millis(500));
    assert!(rx.try_recv().is_err(), "a call returned before the cancel");
    let t0 = Instant::now();
    cc.cancel();
    for _ in 0..4 {
        let (who, r) = rx.recv_timeout(LIMIT).expect("a blocked TLS call did not return after cancel");
        let e = r.expect_err(who);
        assert!(transports::is_cancelled(&e), "{who}: {e}");
    }
    assert!(t0.elapsed() < LIMIT);
    for t in threads {
        t.join().unwrap();
    }
    drop((a_client, b_server));
}

/// One refusal: the server's and the client's errors (the client's from its
/// handshake, or from its first read when the server refused it afterwards).
fn refused(server: &TlsParams, client: &TlsParams) -> (String, String) {
    let (cs, cc) = (CancelToken::new().unwrap(), CancelToken::new().unwrap());
    let (uri, accepted) = serve(server, &cs);
    let client_err = match client.connect(&uri, &cc) {
        Err(e) => engine::error::report(&e),
        // TLS 1.3: the client's part of the handshake is over before the server
        // has checked its certificate; the server's verdict comes as an alert.
        Ok(ch) => {
            let e = ch.read(&mut [0u8; 16]).expect_err("the refused client read data");
            engine::error::report(&e)
        }
    };
    let server_err = match accepted.join().unwrap() {
        Err(e) => engine::error::report(&e),
        Ok(_) => panic!("the server accepted (client said: {client_err})"),
    };
    assert!(!server_err.contains('\n') && !client_err.contains('\n'));
    (server_err, client_err)
}

fn creds_dir(
    root: &Path,
    name: &str,
    ca_pem: &str,
    server: &testkit::tls::Issued,
    client: &testkit::tls::Issued,
) -> PathBuf {
    let d = root.join(name);
    write_dir(&d, ca_pem, Some(server), Some(client)).unwrap();
    d
}

#[test]
fn refusals_name_their_cause() {
    let dir = TestDir::new("tls-refusals");
    let good = dir.join("good");
    let ca = good_dir(&good).unwrap();
    let other = Ca::new("another-ca").unwrap();
    let server = ca.server(&SERVER_NAMES, Validity::Current).unwrap();
    let client = ca.client("qmig-source", Validity::Current).unwrap();

    // A server certificate from another CA.
    let foreign_server = other.server(&SERVER_NAMES, Validity::Current).unwrap();
    let d = creds_dir(dir.path(), "foreign-server", &ca.cert_pem(), &foreign_server, &client);
    let (s, c) = refused(&TlsParams::new(&d), &TlsParams::new(&good));
    assert!(c.contains("not signed by our CA") && c.contains("another CA"), "client: {c}");
    assert!(s.contains("TLS handshake") && s.contains("alert"), "server: {s}");

    // A client certificate from another CA.
    let foreign_client = other.client("qmig-source", Validity::Current).unwrap();
    let d = creds_dir(dir.path(), "foreign-client", &ca.cert_pem(), &server, &foreign_client);
    let (s, c) = refused(&TlsParams::new(&good), &TlsParams::new(&d));
    assert!(s.contains("not signed by our CA"), "server: {s}");
    assert!(c.contains("alert"), "client: {c}");

    // The hostname.
    let mut wrong_name = TlsParams::new(&good);
    wrong_name.hostname = Some("elsewhere.example".into());
    let (s, c) = refused(&TlsParams::new(&good), &wrong_name);
    assert!(c.contains("hostname mismatch") && c.contains("elsewhere.example"), "client: {c}");
    assert!(s.contains("alert"), "server: {s}");

    // Expired certificates, either end.
    let expired_server = ca.server(&SERVER_NAMES, Validity::Expired).unwrap();
    let d = creds_dir(dir.path(), "expired-server", &ca.cert_pem(), &expired_server, &client);
    let (_, c) = refused(&TlsParams::new(&d), &TlsParams::new(&good));
    assert!(c.contains("expired"), "client: {c}");
    let expired_client = ca.client("qmig-source", Validity::Expired).unwrap();
    let d = creds_dir(dir.path(), "expired-client", &ca.cert_pem(), &server, &expired_client);
    let (s, _) = refused(&TlsParams::new(&good), &TlsParams::new(&d));
    assert!(s.contains("expired"), "server: {s}");

    // A client not on the allow-list.
    let mut authz = TlsParams::new(&good);
    authz.authz = Some(TlsAuthz::new(["O=qmig test,CN=someone-else".to_string()]));
    let (s, c) = refused(&authz, &TlsParams::new(&good));
    assert!(s.contains(CLIENT_DN) && s.contains("tls-authz"), "server: {s}");
    assert!(c.contains("alert"), "client: {c}");

    // verify-peer=off on the server: no client certificate asked for, so a client
    // without one gets in; with verify-peer (the default) it is refused.
    let no_client = dir.join("no-client");
    write_dir(&no_client, &ca.cert_pem(), None, None).unwrap();
    let (s, _) = refused(&TlsParams::new(&good), &TlsParams::new(&no_client));
    assert!(s.contains("presented no certificate"), "server: {s}");
    let mut lax = TlsParams::new(&good);
    lax.verify_peer = false;
    let (cs, cc) = (CancelToken::new().unwrap(), CancelToken::new().unwrap());
    let (uri, accepted) = serve(&lax, &cs);
    let ch =
        TlsParams::new(&no_client).connect(&uri, &cc).expect("verify-peer=off lets a client without certificate in");
    let server_ch = accepted.join().unwrap().unwrap();
    assert_eq!(server_ch.tls_peer_dn(), None);
    drop(ch);
}

#[test]
fn plaintext_and_tls_peers_do_not_mix() {
    let dir = TestDir::new("tls-plain");
    let creds = dir.join("creds");
    good_dir(&creds).unwrap();

    // A plaintext source to a TLS destination.
    let cs = CancelToken::new().unwrap();
    let (uri, accepted) = serve(&TlsParams::new(&creds), &cs);
    let plain = transports::connect(&uri, &CancelToken::new().unwrap()).unwrap();
    let mut w = MigrationWriter::new(plain, RateLimit::new(0));
    w.write_all(b"QEVM\0\0\0\x03").unwrap();
    w.flush().unwrap();
    let e = engine::error::report(&accepted.join().unwrap().expect_err("TLS server accepted plaintext"));
    assert!(e.contains("does not speak TLS"), "{e}");
    drop(w);

    // A TLS source to a plaintext destination: the destination names it; the
    // source sees the connection close in its handshake.
    let l = Listener::bind(&loopback(), &cs).unwrap();
    let uri = l.local_uri().clone();
    let plain_dest = thread::spawn(move || {
        let ch = l.accept().unwrap();
        let e = ch.read(&mut [0u8; 64]).expect_err("a plaintext destination read a ClientHello as data");
        engine::error::report(&e)
    });
    let client = TlsParams::new(&creds).connect(&uri, &CancelToken::new().unwrap());
    let d = plain_dest.join().unwrap();
    assert!(d.contains("started a TLS handshake") && d.contains("not configured"), "{d}");
    let c = engine::error::report(&client.expect_err("TLS handshake with a plaintext destination"));
    assert!(c.contains("closed the connection during the handshake"), "{c}");

    // TLS needs a socket, and a hostname on unix:.
    let unix: MigrationUri = format!("unix:{}", dir.join("s.sock").display()).parse().unwrap();
    let e = TlsParams::new(&creds).connect(&unix, &cs).unwrap_err().to_string();
    assert!(e.contains("no hostname available"), "{e}");
    let file: MigrationUri = format!("file:{}", dir.join("f").display()).parse().unwrap();
    let l = Listener::bind(&file, &cs).unwrap();
    let e = l.with_tls(TlsParams::new(&creds).server().unwrap()).err().expect("TLS on file:").to_string();
    assert!(e.contains("needs a socket"), "{e}");
}

const RAM_LEN: usize = 16 << 20;

#[test]
fn cli_send_to_recv_over_tls_with_return_path() {
    let dir = TestDir::new("tls-cli");
    let creds = dir.join("creds");
    good_dir(&creds).unwrap();
    let ram = testkit::pattern::generate(testkit::pattern::Pattern::Mixed { every: 4 }, 5, RAM_LEN);
    let (src, dst) = (dir.join("src.ram"), dir.join("dst.ram"));
    std::fs::write(&src, &ram).unwrap();
    let authz = dir.join("authz.txt");
    std::fs::write(&authz, format!("# sources allowed in\nO=qmig test,CN=someone-else\n{CLIENT_DN}\n")).unwrap();
    let authz_arg = format!("@{}", authz.display());
    let dst_arg = format!("mem={}", dst.display());
    let r = BackgroundQmig::recv(
        &dir,
        &["--ram", &dst_arg, "--from", "tcp:127.0.0.1:0", "--tls-creds", utf8(&creds), "--tls-authz", &authz_arg],
    );
    let uri = r.listening(LIMIT);
    let src_arg = format!("mem={}", src.display());
    // The hostname checked is the URI's host, 127.0.0.1 (an IP subjectAltName).
    let sent = run_qmig(&dir, &["send", "--ram", &src_arg, "--to", &uri, "--tls-creds", utf8(&creds)], LIMIT);
    let (code, last, stderr) = r.wait(LIMIT);
    assert!(sent.status.success(), "send: {}", sent.stderr);
    assert_eq!(code, Some(0), "recv: {stderr}");
    let got: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(got["tls"]["peer-dn"], CLIENT_DN, "{got}");
    assert_eq!(got["tls"]["protocol"], "TLSv1_3", "{got}");
    assert_eq!(got["return-path"]["opened"], true, "{got}");
    let stats: serde_json::Value = serde_json::from_str(sent.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(stats["return-path"]["shut"], 0, "{stats}");
    assert!(stats["return-path"]["pongs"].as_u64().unwrap_or(0) >= 1, "{stats}");
    assert_same_ram("qmig -> qmig over TLS", &std::fs::read(&dst).unwrap(), &ram);
}

#[test]
fn cli_refused_source_leaves_the_destination_untouched() {
    let dir = TestDir::new("tls-cli-refused");
    let creds = dir.join("creds");
    good_dir(&creds).unwrap();
    let (src, dst) = (dir.join("src.ram"), dir.join("dst.ram"));
    std::fs::write(&src, testkit::pattern::generate(testkit::pattern::Pattern::Mixed { every: 4 }, 6, RAM_LEN))
        .unwrap();
    std::fs::write(&dst, vec![0xeeu8; RAM_LEN]).unwrap();
    let dst_arg = format!("mem={}", dst.display());
    let r = BackgroundQmig::recv(
        &dir,
        &[
            "--ram",
            &dst_arg,
            "--from",
            "tcp:127.0.0.1:0",
            "--tls-creds",
            utf8(&creds),
            "--tls-authz",
            "O=qmig test,CN=someone-else",
        ],
    );
    let uri = r.listening(LIMIT);
    let src_arg = format!("mem={}", src.display());
    let sent = run_qmig(&dir, &["send", "--ram", &src_arg, "--to", &uri, "--tls-creds", utf8(&creds)], LIMIT);
    let (code, _, stderr) = r.wait(LIMIT);
    one_line_error("recv", code, &stderr, &["TLS handshake", CLIENT_DN, "tls-authz"]);
    one_line_error("send", sent.status.code(), &sent.stderr, &["TLS", "alert"]);
    let after = std::fs::read(&dst).unwrap();
    assert!(after.iter().all(|&b| b == 0xee), "the refused source's pages reached the destination file");
    // Flags that do not fit: an authz list on the source, TLS on exec:.
    let e = run_qmig(
        &dir,
        &["send", "--ram", &src_arg, "--to", &uri, "--tls-creds", utf8(&creds), "--tls-authz", CLIENT_DN],
        LIMIT,
    );
    one_line_error("send --tls-authz", e.status.code(), &e.stderr, &["tls-authz is for the destination"]);
    let e = run_qmig(
        &dir,
        &["recv", "--ram", &dst_arg, "--from", "exec:cat /dev/null", "--tls-creds", utf8(&creds)],
        LIMIT,
    );
    one_line_error("recv exec: over TLS", e.status.code(), &e.stderr, &["needs a socket"]);
}

#[test]
fn demo_over_tls() {
    let dir = TestDir::new("tls-demo");
    let creds = dir.join("creds");
    good_dir(&creds).unwrap();
    let stats = dir.join("stats.json");
    let args = [
        "demo",
        "--guest",
        "synthetic",
        "--ram-size",
        "32M",
        "--dirty-rate",
        "16",
        "--max-bandwidth",
        "64M",
        "--downtime-limit",
        "50",
        "--uri",
        "tcp:127.0.0.1:0",
        "--tls-creds",
        utf8(&creds),
        "--tls-authz",
        CLIENT_DN,
        "--stats-json",
        utf8(&stats),
    ];
    let r = run_qmig(&dir, &args, Duration::from_secs(60));
    assert!(r.status.success(), "demo over TLS: {}", r.stderr);
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["destination"]["stats"]["tls"]["peer-dn"], CLIENT_DN, "{s}");
}

#[test]
fn unix_socket_with_tls_hostname() {
    let dir = TestDir::new("tls-unix");
    let creds = dir.join("creds");
    good_dir(&creds).unwrap();
    let cancel = CancelToken::new().unwrap();
    let uri: MigrationUri = format!("unix:{}", dir.join("m.sock").display()).parse().unwrap();
    let l = Listener::bind(&uri, &cancel).unwrap().with_tls(TlsParams::new(&creds).server().unwrap()).unwrap();
    let accepted = thread::spawn(move || l.accept());
    let mut client = TlsParams::new(&creds);
    client.hostname = Some("dest.qmig.test".into());
    let ch = client.connect(&uri, &cancel).expect("TLS over unix: with tls-hostname");
    let server = accepted.join().unwrap().unwrap();
    let mut w = MigrationWriter::new(ch, RateLimit::new(0));
    w.write_all(b"QEVM over unix").unwrap();
    let _ch = w.finish().map_err(|(_, e)| e).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut MigrationReader::new(server, RateLimit::new(0)), &mut got).unwrap();
    assert_eq!(got, b"QEVM over unix");
}

/// QEMU's `ca-crl.pem`: a peer whose certificate the CRL lists is refused, in both
/// roles, with the cause named on both ends; a CRL that lists someone else
/// refuses nobody.
#[test]
fn crl_refuses_revoked_peers_in_both_roles() {
    let dir = TestDir::new("tls-crl");
    let ca = Ca::new("qmig-test-ca").unwrap();
    let server = ca.server(&SERVER_NAMES, Validity::Current).unwrap();
    let client = ca.client("qmig-source", Validity::Current).unwrap();
    let bystander = ca.client("someone-else", Validity::Current).unwrap();
    let plain = creds_dir(dir.path(), "plain", &ca.cert_pem(), &server, &client);

    // The destination's CRL revokes the source's certificate.
    let revoking = creds_dir(dir.path(), "revokes-client", &ca.cert_pem(), &server, &client);
    std::fs::write(revoking.join("ca-crl.pem"), ca.crl(&[&client]).unwrap()).unwrap();
    let (s, c) = refused(&TlsParams::new(&revoking), &TlsParams::new(&plain));
    assert!(s.contains("revoked") && s.contains("ca-crl.pem"), "server: {s}");
    assert!(c.contains("alert") && c.contains("revoked"), "client: {c}");

    // The source's CRL revokes the destination's certificate.
    let revoking = creds_dir(dir.path(), "revokes-server", &ca.cert_pem(), &server, &client);
    std::fs::write(revoking.join("ca-crl.pem"), ca.crl(&[&server]).unwrap()).unwrap();
    let (s, c) = refused(&TlsParams::new(&plain), &TlsParams::new(&revoking));
    assert!(c.contains("revoked") && c.contains("ca-crl.pem"), "client: {c}");
    assert!(s.contains("TLS handshake"), "server: {s}");

    // A CRL listing another certificate, on both ends: the migration's peers get in.
    let other = creds_dir(dir.path(), "revokes-other", &ca.cert_pem(), &server, &client);
    std::fs::write(other.join("ca-crl.pem"), ca.crl(&[&bystander]).unwrap()).unwrap();
    let (cs, cc) = (CancelToken::new().unwrap(), CancelToken::new().unwrap());
    let (uri, accepted) = serve(&TlsParams::new(&other), &cs);
    let ch = TlsParams::new(&other).connect(&uri, &cc).expect("a CRL of someone else refused the client");
    let server_ch = accepted.join().unwrap().expect("a CRL of someone else refused the client");
    assert_eq!(server_ch.tls_peer_dn().as_deref(), Some(CLIENT_DN));
    drop(ch);

    // A CRL file that is not one is a credentials error naming it.
    let broken = creds_dir(dir.path(), "broken-crl", &ca.cert_pem(), &server, &client);
    std::fs::write(broken.join("ca-crl.pem"), "not a CRL\n").unwrap();
    let e = TlsParams::new(&broken).server().unwrap_err().to_string();
    assert!(e.contains("ca-crl.pem"), "{e}");
}

/// A TLS handshake that stalls ends within the io timeout on either end, naming the
/// cause: a peer that connects and says nothing, one that stops half-way through,
/// and a server that accepts and never answers.
#[test]
fn stalled_handshake_ends_within_the_io_timeout() {
    let dir = TestDir::new("tls-stall");
    let creds = dir.join("creds");
    good_dir(&creds).unwrap();
    let io = Duration::from_secs(1);
    let opts = transports::ChannelOptions::with_io_timeout(Some(io));

    // The destination: a client that sends nothing, then one that stops in its ClientHello.
    for (sent, cause) in [
        (&[][..], "sent no TLS handshake within 1 s (io-timeout)"),
        (&[0x16, 0x03, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00][..], "half-way through the handshake"),
    ] {
        let cancel = CancelToken::new().unwrap();
        let l = Listener::bind(&loopback(), &cancel)
            .unwrap()
            .with_options(opts)
            .with_tls(TlsParams::new(&creds).server().unwrap())
            .unwrap();
        let MigrationUri::Tcp { host, port } = l.local_uri().clone() else { panic!("not tcp") };
        let mut silent = std::net::TcpStream::connect((host.as_str(), port)).unwrap();
        silent.write_all(sent).unwrap();
        let t = Instant::now();
        let e = engine::error::report(&l.accept().expect_err("a stalled handshake was accepted"));
        let took = t.elapsed();
        assert!(took >= io && took < LIMIT, "the handshake ended after {took:?}");
        assert!(e.contains("TLS handshake") && e.contains(cause) && !e.contains('\n'), "{e}");
        drop(silent);
    }

    // The source: a listener that accepts and never answers the ClientHello.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri: MigrationUri = format!("tcp:127.0.0.1:{}", silent.local_addr().unwrap().port()).parse().unwrap();
    let keep = thread::spawn(move || silent.accept().map(|(s, _)| s));
    let t = Instant::now();
    let e = TlsParams::new(&creds)
        .connect_with(&uri, &CancelToken::new().unwrap(), &opts)
        .expect_err("a silent server completed the handshake");
    let took = t.elapsed();
    let e = engine::error::report(&e);
    assert!(took >= io && took < LIMIT, "the handshake ended after {took:?}");
    assert!(e.contains("sent no TLS handshake within 1 s") && !e.contains('\n'), "{e}");
    drop(keep.join().unwrap());

    // After the handshake a session that goes quiet fails a read at the io timeout,
    // as a plaintext channel does.
    let cancel = CancelToken::new().unwrap();
    let l = Listener::bind(&loopback(), &cancel)
        .unwrap()
        .with_options(opts)
        .with_tls(TlsParams::new(&creds).server().unwrap())
        .unwrap();
    let uri = l.local_uri().clone();
    let accepted = thread::spawn(move || l.accept());
    let client = TlsParams::new(&creds).connect_with(&uri, &CancelToken::new().unwrap(), &opts).unwrap();
    let server_ch = accepted.join().unwrap().unwrap();
    let t = Instant::now();
    let e = server_ch.read(&mut [0u8; 16]).expect_err("a quiet TLS session read data");
    assert!(transports::is_no_progress(&e), "{e}");
    assert!(t.elapsed() >= io && t.elapsed() < LIMIT, "the read ended after {:?}", t.elapsed());
    drop(client);
}

/// The CLI: `qmig recv --tls-creds --io-timeout 2` with a client that connects and
/// says nothing, and `qmig send --tls-creds --io-timeout 2` to a server that accepts
/// and never answers: each ends with one line naming the cause, well within the limit.
#[test]
fn cli_stalled_handshake_ends_within_the_io_timeout() {
    let dir = TestDir::new("tls-cli-stall");
    let creds = dir.join("creds");
    good_dir(&creds).unwrap();
    let (src, dst) = (dir.join("src.ram"), dir.join("dst.ram"));
    std::fs::write(&src, vec![7u8; 1 << 20]).unwrap();
    let dst_arg = format!("mem={}", dst.display());
    let r = BackgroundQmig::recv(
        &dir,
        &["--ram", &dst_arg, "--from", "tcp:127.0.0.1:0", "--tls-creds", utf8(&creds), "--io-timeout", "2"],
    );
    let uri = r.listening(LIMIT);
    let addr = uri.strip_prefix("tcp:").unwrap().to_string();
    let silent = std::net::TcpStream::connect(&addr).unwrap();
    let t = Instant::now();
    let (code, _, stderr) = r.wait(LIMIT);
    assert!(t.elapsed() < LIMIT, "recv took {:?}", t.elapsed());
    one_line_error("recv", code, &stderr, &["TLS handshake", "sent no TLS handshake within 2 s (io-timeout)"]);
    drop(silent);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = format!("tcp:127.0.0.1:{}", listener.local_addr().unwrap().port());
    let keep = thread::spawn(move || listener.accept().map(|(s, _)| s));
    let src_arg = format!("mem={}", src.display());
    let t = Instant::now();
    let sent = run_qmig(
        &dir,
        &["send", "--ram", &src_arg, "--to", &to, "--tls-creds", utf8(&creds), "--io-timeout", "2"],
        LIMIT,
    );
    assert!(t.elapsed() < LIMIT, "send took {:?}", t.elapsed());
    one_line_error("send", sent.status.code(), &sent.stderr, &["TLS handshake", "sent no TLS handshake within 2 s"]);
    drop(keep.join().unwrap());
}
