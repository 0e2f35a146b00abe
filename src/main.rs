//! The `qmig` command line.

mod demo;
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
mod kvm_demo;

use clap::{Parser, Subcommand};
use qmig::analyze::{analyze, AnalyzeOptions};
use qmig::ramfile::parse_name_path;
use qmig::send::SendOptions;
use savevm_format::StoppedGuest;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use transports::{CancelToken, MigrationUri};

/// qmig: QEMU-compatible live migration in Rust.
#[derive(Parser)]
#[command(name = "qmig", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Decode a migration stream and print it as one JSON document.
    Analyze {
        /// The stream file (as written by QEMU `migrate "exec:cat > FILE"` or `qmig save`).
        stream: PathBuf,
        /// Write RAM block NAME's final image to PATH (sparse file of the block's length). Repeatable.
        #[arg(long = "extract-ram", value_name = "NAME=PATH")]
        extract_ram: Vec<String>,
        /// A multifd channel capture belonging to this stream (one file per channel). Repeatable.
        #[arg(long = "multifd-channel", value_name = "PATH")]
        multifd_channel: Vec<PathBuf>,
    },
    /// Write the stream of a stopped `-machine none` guest to a file (same as `send --to file:STREAM`).
    Save {
        #[command(flatten)]
        guest: GuestArgs,
        /// The stream file to write.
        #[arg(long = "out", value_name = "STREAM")]
        out: PathBuf,
    },
    /// Send a stopped `-machine none` guest to a destination URI (tcp:, unix:, fd:, exec:, file:).
    Send {
        #[command(flatten)]
        guest: GuestArgs,
        /// Destination: tcp:HOST:PORT, unix:PATH, fd:N, exec:COMMAND or file:PATH[,offset=N].
        #[arg(long = "to", value_name = "URI")]
        to: String,
        /// Rate limit in bytes/s (QEMU's `max-bandwidth`; 0 = unlimited, the default here, where QEMU uses 128 MiB/s).
        #[arg(long = "max-bandwidth", value_name = "BYTES_PER_S", default_value_t = 0)]
        max_bandwidth: u64,
        /// QEMU's `downtime-limit` in ms.
        #[arg(long = "downtime-limit", value_name = "MS", default_value_t = 300)]
        downtime_limit: u64,
        /// QEMU's `auto-converge`.
        #[arg(long = "auto-converge")]
        auto_converge: bool,
        /// QEMU's `return-path` (the default on tcp:, unix: and fd: sockets): complete only after the destination's SHUT(0); refused on exec: and file:.
        #[arg(long = "return-path", conflicts_with = "no_return_path")]
        return_path: bool,
        /// No return path: complete once EOF is written, whatever the destination makes of it.
        #[arg(long = "no-return-path")]
        no_return_path: bool,
        /// Also write the final statistics to this file.
        #[arg(long = "stats-json", value_name = "PATH")]
        stats_json: Option<PathBuf>,
    },
    /// Live-migrate a guest that keeps writing its memory (a KVM guest where /dev/kvm works, else a synthetic one), then verify the destination.
    Demo {
        /// The guest: `kvm` (a real guest on KVM, migrated to a qmig VMM process), `synthetic` (writer threads), or `auto` (kvm where /dev/kvm works and --dest is qmig).
        #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "synthetic"])]
        guest: String,
        /// Shorthand for `--guest kvm`.
        #[arg(long, conflicts_with = "guest")]
        kvm: bool,
        /// KVM guest: memory slots, 1 or 2 (2 splits RAM around a PCI hole, scaled down).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
        slots: u32,
        /// KVM guest: bytes of its working set, where its page writes go (suffixes K, M, G).
        #[arg(long = "working-set", default_value = "256M", value_parser = parse_size)]
        working_set: u64,
        /// KVM guest: ms it runs on the destination before its counter and checksum are read.
        #[arg(long = "run-on", value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1000..))]
        run_on: u64,
        /// Guest RAM size (suffixes K, M, G).
        #[arg(long = "ram-size", default_value = "1G", value_parser = parse_size)]
        ram_size: u64,
        /// MiB/s the guest dirties (KVM: page writes at random in its working set; synthetic: 80 % in a hot set).
        #[arg(long = "dirty-rate", value_name = "MIB_PER_S", default_value_t = 64)]
        dirty_rate: u64,
        /// The guest's vCPUs (KVM: each runs the guest program on its own slice of the working set; synthetic: writer threads).
        #[arg(long, default_value_t = 1)]
        vcpus: usize,
        /// Transport: unix:PATH or tcp:HOST:PORT (default: a unix socket in a temporary directory).
        #[arg(long)]
        uri: Option<String>,
        /// QEMU's `downtime-limit` in ms.
        #[arg(long = "downtime-limit", value_name = "MS", default_value_t = 300)]
        downtime_limit: u64,
        /// QEMU's `max-bandwidth` in bytes/s (0 = unlimited).
        #[arg(long = "max-bandwidth", value_name = "BYTES_PER_S", default_value_t = 512 << 20)]
        max_bandwidth: u64,
        /// QEMU's `auto-converge`: throttle the writer threads when they dirty faster than we send.
        #[arg(long = "auto-converge")]
        auto_converge: bool,
        /// No return path (on by default: the source completes only after the destination's SHUT(0)).
        #[arg(long = "no-return-path")]
        no_return_path: bool,
        /// Destination: `qmig` (a qmig recv process) or `qemu` (a real QEMU 7.2).
        #[arg(long, default_value = "qmig", value_parser = ["qmig", "qemu"])]
        dest: String,
        /// Seed of the guest's content and writes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also write the final statistics (and "verified") to this file.
        #[arg(long = "stats-json", value_name = "PATH")]
        stats_json: Option<PathBuf>,
    },
    /// The destination VMM of the KVM demo: load a migrating KVM guest, resume it, report its counter and checksum.
    #[command(hide = true, name = "kvm-dest")]
    KvmDest {
        /// Source URI to listen on (unix: or tcp:).
        #[arg(long = "from", value_name = "URI")]
        from: String,
        /// Guest RAM size.
        #[arg(long = "ram-size", value_parser = parse_size)]
        ram_size: u64,
        /// Memory slots (1 or 2).
        #[arg(long, default_value_t = 2)]
        slots: u32,
        /// vCPUs (as the source's).
        #[arg(long, default_value_t = 1)]
        vcpus: usize,
        /// ms the guest runs before it is read.
        #[arg(long = "run-on", value_name = "MS", default_value_t = 1000)]
        run_on: u64,
    },
    /// Receive a migration from a source URI into RAM files; exit 0 only on a complete, checked stream.
    Recv {
        /// RAM block NAME goes to file PATH (created if missing, else its length must match). Repeatable.
        #[arg(long = "ram", value_name = "NAME=PATH", required = true)]
        ram: Vec<String>,
        /// Source: tcp:HOST:PORT (port 0 picks one), unix:PATH, fd:N, exec:COMMAND or file:PATH[,offset=N].
        #[arg(long = "from", value_name = "URI")]
        from: String,
        /// Also write the final statistics to this file.
        #[arg(long = "stats-json", value_name = "PATH")]
        stats_json: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct GuestArgs {
    /// RAM block NAME is the file PATH (length a positive multiple of 4096). Repeatable.
    #[arg(long = "ram", value_name = "NAME=PATH", required = true)]
    ram: Vec<String>,
    /// Runstate recorded in `globalstate` (`prelaunch` keeps a `-S` destination in prelaunch).
    #[arg(long, default_value = "prelaunch")]
    runstate: String,
}

impl GuestArgs {
    fn parse(&self) -> qmig::Result<(Vec<(String, PathBuf)>, StoppedGuest)> {
        if !savevm_format::builtin::RUN_STATES.contains(&self.runstate.as_str()) {
            return Err(qmig::Error::Usage(format!("unknown runstate '{}'", self.runstate)));
        }
        let ram = self.ram.iter().map(|s| parse_name_path(s)).collect::<qmig::Result<Vec<_>>>()?;
        Ok((ram, StoppedGuest { runstate: self.runstate.clone(), ..Default::default() }))
    }
}

/// Print the final statistics line, and write it to `path` too when given.
fn write_stats(path: Option<&std::path::Path>, stats: &serde_json::Value) -> qmig::Result<()> {
    if let Some(p) = path {
        std::fs::write(p, format!("{stats}\n")).map_err(|e| qmig::Error::file(p, e))?;
    }
    print_line(stats);
    Ok(())
}

/// `1G`, `64M`, `4096`, `512K`.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("'{s}' is not a size like 1G, 64M or 4096"))
}

fn uri(s: &str) -> qmig::Result<MigrationUri> {
    let uri = s.parse::<MigrationUri>().map_err(|e| qmig::Error::Transport(e.into()))?;
    if let MigrationUri::Fd(n) = uri {
        // SAFETY: F_GETFD only reads the descriptor's flags; any `n` is allowed (EBADF).
        let flags = unsafe { libc::fcntl(n, libc::F_GETFD) };
        // Every descriptor qmig opens is close-on-exec; one it inherited cannot be.
        if flags >= 0 && flags & libc::FD_CLOEXEC != 0 {
            return Err(qmig::Error::Usage(format!(
                "fd:{n}: descriptor {n} is one qmig opened itself (close-on-exec), not one it was handed"
            )));
        }
    }
    Ok(uri)
}

/// Whether `qmig demo` runs the KVM guest: `auto` picks it where /dev/kvm works and
/// the destination is qmig, and says on stderr why not otherwise.
fn use_kvm(guest: &str, dest: &str) -> qmig::Result<bool> {
    let why_not = kvm_unavailable();
    match (guest, dest, why_not) {
        ("synthetic", _, _) => Ok(false),
        ("kvm", "qemu", _) => Err(qmig::Error::Usage(
            "--guest kvm needs --dest qmig (QEMU cannot load this VMM's 'cpu' section); use --guest synthetic".into(),
        )),
        ("kvm", _, Some(why)) => Err(qmig::Error::Usage(format!("--guest kvm: {why}"))),
        ("kvm", _, None) => Ok(true),
        (_, "qemu", _) => Ok(false),
        (_, _, Some(why)) => {
            eprintln!("qmig demo: no KVM guest ({why}); migrating a synthetic guest instead");
            Ok(false)
        }
        (_, _, None) => Ok(true),
    }
}

#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
fn kvm_unavailable() -> Option<String> {
    minivmm::kvm_unavailable()
}

#[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
fn kvm_unavailable() -> Option<String> {
    Some("this qmig was built without the `kvm` feature".into())
}

#[cfg_attr(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")), allow(dead_code))]
struct KvmArgs<'a> {
    ram_size: u64,
    slots: u32,
    vcpus: usize,
    working_set: u64,
    dirty_rate: u64,
    uri: Option<String>,
    params: engine::params::MigrationParameters,
    auto_converge: bool,
    return_path: bool,
    seed: u64,
    run_on: u64,
    stats_json: Option<PathBuf>,
    cancel: &'a transports::CancelToken,
}

#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
fn kvm_demo(a: KvmArgs<'_>) -> qmig::Result<()> {
    let opts = kvm_demo::KvmDemoOptions {
        ram_size: a.ram_size,
        slots: a.slots,
        vcpus: a.vcpus,
        working_set: a.working_set,
        dirty_rate: a.dirty_rate,
        uri: a.uri,
        params: a.params,
        auto_converge: a.auto_converge,
        return_path: a.return_path,
        seed: a.seed,
        run_on: std::time::Duration::from_millis(a.run_on),
        progress: true,
    };
    let (stats, verified) = kvm_demo::demo(&opts, a.cancel)?;
    write_stats(a.stats_json.as_deref(), &stats)?;
    if !verified {
        return Err(qmig::Error::Usage(format!("verification failed: {}", stats["guest"])));
    }
    Ok(())
}

#[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
fn kvm_demo(_: KvmArgs<'_>) -> qmig::Result<()> {
    Err(qmig::Error::Usage(kvm_unavailable().unwrap_or_default()))
}

#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
fn kvm_dest(
    from: &MigrationUri,
    (ram_size, slots, vcpus): (u64, u32, usize),
    run_on: u64,
    cancel: &transports::CancelToken,
) -> qmig::Result<()> {
    let run_on = std::time::Duration::from_millis(run_on);
    let report = kvm_demo::dest(ram_size, slots, vcpus, from, run_on, cancel, |bound| {
        print_line(&serde_json::json!({ "listening": bound.to_string() }))
    })?;
    print_line(&report);
    Ok(())
}

#[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
fn kvm_dest(_: &MigrationUri, _: (u64, u32, usize), _: u64, _: &transports::CancelToken) -> qmig::Result<()> {
    Err(qmig::Error::Usage(kvm_unavailable().unwrap_or_default()))
}

fn print_line(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn run(cli: Cli, cancel: &CancelToken) -> qmig::Result<()> {
    match cli.cmd {
        Cmd::Analyze { stream, extract_ram, multifd_channel } => {
            let extract = extract_ram.iter().map(|s| parse_name_path(s)).collect::<qmig::Result<Vec<_>>>()?;
            let doc = analyze(&stream, &AnalyzeOptions { extract, multifd_channels: multifd_channel })?;
            print_line(&doc);
        }
        Cmd::Save { guest, out } => {
            let (ram, guest) = guest.parse()?;
            let to = MigrationUri::File { path: out, offset: 0 };
            let opts = SendOptions { runstate: guest.runstate, ..Default::default() };
            let info = qmig::send::send(&ram, &to, &opts, cancel)?;
            print_line(&info.to_json());
        }
        Cmd::Send {
            guest,
            to,
            max_bandwidth,
            downtime_limit,
            auto_converge,
            return_path,
            no_return_path,
            stats_json,
        } => {
            let (ram, guest) = guest.parse()?;
            let to = uri(&to)?;
            let opts = SendOptions {
                runstate: guest.runstate,
                params: engine::params::MigrationParameters { max_bandwidth, downtime_limit, ..Default::default() },
                auto_converge,
                return_path: if return_path {
                    Some(true)
                } else if no_return_path {
                    Some(false)
                } else {
                    None
                },
            };
            let info = qmig::send::send(&ram, &to, &opts, cancel)?;
            write_stats(stats_json.as_deref(), &qmig::send::stats_json(&info))?;
        }
        Cmd::Demo {
            guest,
            kvm,
            slots,
            working_set,
            run_on,
            ram_size,
            dirty_rate,
            vcpus,
            uri,
            downtime_limit,
            max_bandwidth,
            auto_converge,
            no_return_path,
            dest,
            seed,
            stats_json,
        } => {
            let params = engine::params::MigrationParameters { downtime_limit, max_bandwidth, ..Default::default() };
            if use_kvm(if kvm { "kvm" } else { &guest }, &dest)? {
                return kvm_demo(KvmArgs {
                    ram_size,
                    slots,
                    vcpus,
                    working_set,
                    dirty_rate: dirty_rate << 20,
                    uri,
                    params,
                    auto_converge,
                    return_path: !no_return_path,
                    seed,
                    run_on,
                    stats_json,
                    cancel,
                });
            }
            let opts = demo::DemoOptions {
                ram_size,
                dirty_rate: dirty_rate << 20,
                vcpus,
                uri,
                params,
                auto_converge,
                return_path: !no_return_path,
                dest: if dest == "qemu" { demo::Destination::Qemu } else { demo::Destination::Qmig },
                seed,
                progress: true,
            };
            let (stats, verified) = demo::demo(&opts, cancel)?;
            write_stats(stats_json.as_deref(), &stats)?;
            if !verified {
                return Err(qmig::Error::Usage(format!(
                    "verification failed: {} pages of the destination differ from the source at stop",
                    stats["differing-pages"]
                )));
            }
        }
        Cmd::KvmDest { from, ram_size, slots, vcpus, run_on } => {
            kvm_dest(&uri(&from)?, (ram_size, slots, vcpus), run_on, cancel)?
        }
        Cmd::Recv { ram, from, stats_json } => {
            let ram = ram.iter().map(|s| parse_name_path(s)).collect::<qmig::Result<Vec<_>>>()?;
            let from = uri(&from)?;
            let st = qmig::recv::recv(&ram, &from, cancel, |bound| {
                if matches!(bound, MigrationUri::Tcp { .. } | MigrationUri::Unix(_)) {
                    print_line(&serde_json::json!({ "listening": bound.to_string() }));
                }
            })?;
            write_stats(stats_json.as_deref(), &st.to_json())?;
        }
    }
    Ok(())
}

/// Block SIGINT and SIGTERM in every thread and turn them into a cancel from a
/// dedicated thread, so a blocked transfer is woken through the same path as an
/// API cancel. Returns the signal number once one arrived.
fn cancel_on_signals(cancel: &CancelToken) -> Arc<AtomicI32> {
    use nix::sys::signal::{SigSet, Signal};
    let got = Arc::new(AtomicI32::new(0));
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if set.thread_block().is_ok() {
        let (g, c) = (got.clone(), cancel.clone());
        std::thread::spawn(move || {
            if let Ok(sig) = set.wait() {
                g.store(sig as i32, Ordering::SeqCst);
                c.cancel();
            }
        });
    }
    got
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print as clap does, exit 0.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Usage errors keep the error contract: exit 1, one line.
            let text = e.render().to_string();
            let what: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let line = what.join(" ");
            let line = line.trim_start_matches("error: ");
            eprintln!("qmig: error: {line} (see qmig --help)");
            return ExitCode::from(1);
        }
    };
    let cancel = match CancelToken::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qmig: error: cannot create the cancel token: {e}");
            return ExitCode::from(1);
        }
    };
    let signal = cancel_on_signals(&cancel);
    match run(cli, &cancel) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let sig = signal.load(Ordering::SeqCst);
            if sig != 0 || e.is_cancelled() {
                let name = match sig {
                    2 => "SIGINT",
                    15 => "SIGTERM",
                    _ => "a cancel request",
                };
                eprintln!("qmig: cancelled by {name}; the migration did not complete");
                return ExitCode::from(if sig == 15 { 143 } else { 130 });
            }
            eprintln!("qmig: error: {}", e.report());
            ExitCode::from(1)
        }
    }
}
