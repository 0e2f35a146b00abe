//! The return path: a socket channel read and written in the other direction from
//! another thread while the main direction is in use; cancel wakes a blocked
//! return-path read; `exec:` and `file:` refuse with a typed error.

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};
use transports::{connect, CancelToken, Listener, MigrationUri, TransportError};

fn pair(uri: &str) -> (transports::Channel, transports::Channel, CancelToken, CancelToken) {
    let (ct, lt) = (CancelToken::new().unwrap(), CancelToken::new().unwrap());
    let uri: MigrationUri = uri.parse().unwrap();
    let l = Listener::bind(&uri, &lt).unwrap();
    let bound = l.local_uri().clone();
    let acc = thread::spawn(move || l.accept().unwrap());
    let src = connect(&bound, &ct).unwrap();
    (src, acc.join().unwrap(), ct, lt)
}

fn both_directions(uri: &str) {
    let (src, dst, _ct, _lt) = pair(uri);
    // The destination answers on its return path while the source keeps streaming.
    let dst_rp = dst.return_path().unwrap();
    let src_rp = src.return_path().unwrap();
    let answer = thread::spawn(move || {
        let mut got = vec![0u8; 1 << 20];
        let mut n = 0;
        while n < got.len() {
            let k = dst.read(&mut got[n..]).unwrap();
            assert!(k > 0, "stream ended early");
            n += k;
            if n >= 8 && n - k < 8 {
                (&dst_rp).write_all(b"PONG0001").unwrap();
            }
        }
        (&dst_rp).write_all(b"SHUT").unwrap();
        got
    });
    let reader = thread::spawn(move || {
        let mut v = Vec::new();
        (&src_rp).read_to_end(&mut v).unwrap();
        v
    });
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7) as u8).collect();
    let mut off = 0;
    while off < data.len() {
        off += src.write_vectored(&[std::io::IoSlice::new(&data[off..])]).unwrap();
    }
    assert_eq!(answer.join().unwrap(), data);
    drop(src);
    assert_eq!(reader.join().unwrap(), b"PONG0001SHUT");
}

#[test]
fn tcp_return_path_both_directions() {
    both_directions("tcp:127.0.0.1:0");
}

#[test]
fn unix_return_path_both_directions() {
    let p = std::env::temp_dir().join(format!("qmig-rp-{}.sock", std::process::id()));
    both_directions(&format!("unix:{}", p.display()));
}

#[test]
fn cancel_wakes_a_blocked_return_path_read() {
    let (src, _dst, ct, _lt) = pair("tcp:127.0.0.1:0");
    let rp = src.return_path().unwrap();
    let t = thread::spawn(move || {
        let mut b = [0u8; 8];
        let t0 = Instant::now();
        let r = rp.read(&mut b);
        (r, t0.elapsed())
    });
    thread::sleep(Duration::from_millis(100));
    ct.cancel();
    let (r, took) = t.join().unwrap();
    let e = r.unwrap_err();
    assert!(transports::is_cancelled(&e), "{e}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[test]
fn exec_and_file_refuse_a_return_path() {
    let c = CancelToken::new().unwrap();
    let ch = connect(&"exec:cat >/dev/null".parse().unwrap(), &c).unwrap();
    let e = ch.return_path().unwrap_err();
    assert!(matches!(e, TransportError::NoReturnPath { .. }), "{e}");
    assert!(e.to_string().contains("no return path"), "{e}");
    ch.finish().unwrap();
    let f = std::env::temp_dir().join(format!("qmig-rp-{}.bin", std::process::id()));
    let ch = connect(&format!("file:{}", f.display()).parse().unwrap(), &c).unwrap();
    let e = ch.return_path().unwrap_err();
    assert!(matches!(e, TransportError::NoReturnPath { .. }), "{e}");
    drop(ch);
    let _ = std::fs::remove_file(f);
}
