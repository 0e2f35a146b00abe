//! The `qmig` command line.

mod agent_cli;
mod demo;
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
mod kvm_demo;
mod tls_args;

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
    /// Log the engine's spans and events to stderr at this level (error, warn, info, debug, trace, or a RUST_LOG filter); RUST_LOG is read when absent.
    #[arg(long, global = true, value_name = "LEVEL")]
    log: Option<String>,
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
        /// Write the stream as one zstd frame (`zstd -dc` gives it back), LEVEL 1..19 (default 1); `recv --from file:` reads it.
        #[arg(long, value_name = "zstd[:LEVEL]")]
        compress: Option<qmig::compress::Compression>,
    },
    /// Send a stopped `-machine none` guest to a destination URI (tcp:, unix:, fd:, exec:, file:). The guest never runs, so there is nothing to converge: no --downtime-limit or --auto-converge here (`demo` migrates a live guest).
    Send {
        #[command(flatten)]
        guest: GuestArgs,
        /// Destination: tcp:HOST:PORT, unix:PATH, fd:N, exec:COMMAND or file:PATH[,offset=N].
        #[arg(long = "to", value_name = "URI")]
        to: String,
        /// Rate limit in bytes/s, suffixes K, M, G (32M = 32 MiB/s) (QEMU's `max-bandwidth`; 0 = unlimited, the default here, where QEMU uses 128 MiB/s).
        #[arg(long = "max-bandwidth", value_name = "BYTES_PER_S", default_value = "0", value_parser = parse_size)]
        max_bandwidth: u64,
        /// Give up after this many seconds (virsh's `--timeout`), doing --timeout-action.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// What --timeout does: `cancel` the migration, or `switchover` (send the rest now, whatever the downtime limit).
        #[arg(long = "timeout-action", default_value = "cancel", requires = "timeout")]
        timeout_action: qmig::watch::TimeoutAction,
        /// QEMU's `return-path` (the default on tcp:, unix: and fd: sockets): complete only after the destination's SHUT(0); refused on exec: and file:.
        #[arg(long = "return-path", conflicts_with = "no_return_path")]
        return_path: bool,
        /// No return path: complete once EOF is written, whatever the destination makes of it.
        #[arg(long = "no-return-path")]
        no_return_path: bool,
        /// Fail when a socket read or write makes no progress for this many seconds (TCP keepalive and TCP_USER_TIMEOUT too, on tcp); 0 waits for ever, as QEMU does.
        #[arg(long = "io-timeout", value_name = "SECS", default_value = "30")]
        io_timeout: f64,
        /// Also write the final statistics to this file.
        #[arg(long = "stats-json", value_name = "PATH")]
        stats_json: Option<PathBuf>,
        #[command(flatten)]
        xbzrle: XbzrleArgs,
        /// Write the stream as one zstd frame (`zstd -dc` gives it back), LEVEL 1..19 (default 1); file: and exec: only.
        #[arg(long, value_name = "zstd[:LEVEL]")]
        compress: Option<qmig::compress::Compression>,
        /// TLS.
        #[command(flatten)]
        tls: tls_args::TlsArgs,
        /// QEMU's `postcopy-ram` (needs the return path, so a socket): allow switching to postcopy (the destination must have it too).
        #[arg(long, conflicts_with = "no_return_path")]
        postcopy: bool,
        /// With --postcopy: switch to postcopy after SECS, or when the first pass has sent every page if sooner (0: as soon as allowed); without it, only on `qmig migrate-start-postcopy`.
        #[arg(long = "postcopy-after", value_name = "SECS", requires = "postcopy")]
        postcopy_after: Option<f64>,
        /// QEMU's `pause-before-switchover`: hold in `pre-switchover` (guest stopped) until `qmig migrate-continue --control unix:PATH`.
        #[arg(long = "pause-before-switchover", requires = "control")]
        pause_before_switchover: bool,
        /// Rate limit of the background pages in postcopy, bytes/s with suffixes (QEMU's `max-postcopy-bandwidth`; 0 = unlimited); requested pages are never held by it.
        #[arg(long = "max-postcopy-bandwidth", value_name = "BYTES_PER_S", default_value = "0", value_parser = parse_size, requires = "postcopy")]
        max_postcopy_bandwidth: u64,
        /// A control socket for a second command: `qmig migrate-continue` / `migrate-start-postcopy` / `query-migrate` (see README).
        #[arg(long, value_name = "unix:PATH")]
        control: Option<String>,
        #[command(flatten)]
        multifd: MultifdArgs,
        /// QEMU's `-uuid` of the guest (8-4-4-4-12 hex digits), carried in each multifd channel's initial packet: a QEMU 7.2 peer requires its own (libvirt starts QEMU with -uuid). Default all zeros, as QEMU without -uuid.
        #[arg(long = "uuid", value_name = "UUID", value_parser = parse_uuid_bytes, requires = "multifd")]
        uuid: Option<[u8; 16]>,
    },
    /// Tell a `qmig send --pause-before-switchover` held in `pre-switchover` to go on (QEMU's `migrate-continue`).
    #[command(name = "migrate-continue")]
    MigrateContinue {
        /// The send's control socket.
        #[arg(long, value_name = "unix:PATH")]
        control: String,
    },
    /// Switch a `qmig send --postcopy` to postcopy at its next iteration (QEMU's `migrate-start-postcopy`).
    #[command(name = "migrate-start-postcopy")]
    MigrateStartPostcopy {
        /// The send's control socket.
        #[arg(long, value_name = "unix:PATH")]
        control: String,
    },
    /// Print a running `qmig send`'s `query-migrate` statistics (one JSON line).
    #[command(name = "query-migrate")]
    QueryMigrate {
        /// The send's control socket.
        #[arg(long, value_name = "unix:PATH")]
        control: String,
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
        /// KVM guest: bytes of its working set, where its page writes go (suffixes K, M, G; default 256M, or a quarter of --ram-size when that is smaller).
        #[arg(long = "working-set", value_parser = parse_size)]
        working_set: Option<u64>,
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
        /// Connect the source to this URI instead of --uri (where the destination listens): through a proxy or tunnel.
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        /// QEMU's `downtime-limit` in ms.
        #[arg(long = "downtime-limit", value_name = "MS", default_value_t = 300)]
        downtime_limit: u64,
        /// QEMU's `max-bandwidth` in bytes/s, suffixes K, M, G (32M = 32 MiB/s; 0 = unlimited).
        #[arg(long = "max-bandwidth", value_name = "BYTES_PER_S", default_value = "512M", value_parser = parse_size)]
        max_bandwidth: u64,
        /// Give up after this many seconds (virsh's `--timeout`), doing --timeout-action.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// What --timeout does: `cancel` the migration (the guest runs on here), or `switchover` (stop the guest and send the rest now, whatever the downtime limit).
        #[arg(long = "timeout-action", default_value = "cancel", requires = "timeout")]
        timeout_action: qmig::watch::TimeoutAction,
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
        /// Fail when a socket read or write makes no progress for this many seconds (TCP keepalive and TCP_USER_TIMEOUT too, on tcp); 0 waits for ever, as QEMU does.
        #[arg(long = "io-timeout", value_name = "SECS", default_value = "30")]
        io_timeout: f64,
        /// Also write the final statistics (and "verified") to this file.
        #[arg(long = "stats-json", value_name = "PATH")]
        stats_json: Option<PathBuf>,
        #[command(flatten)]
        multifd: MultifdArgs,
        #[command(flatten)]
        xbzrle: XbzrleArgs,
        /// KVM guest: 4 KiB pages only (by default guest RAM uses transparent huge pages where the kernel offers them, MADV_HUGEPAGE).
        #[arg(long = "no-huge-pages")]
        no_huge_pages: bool,
        /// Synthetic guest: also write the stream sent to this file (for `qmig analyze`); implies --no-return-path.
        #[arg(long, value_name = "PATH")]
        capture: Option<PathBuf>,
        /// TLS.
        #[command(flatten)]
        tls: tls_args::TlsArgs,
        /// KVM guest: capability postcopy-ram on both ends; the switch to postcopy comes after the first pass, or --postcopy-after.
        #[arg(long = "postcopy", conflicts_with = "no_return_path")]
        postcopy: bool,
        /// Start postcopy this many seconds after the migration started, or when the first pass is done if sooner.
        #[arg(long = "postcopy-after", value_name = "SECS", requires = "postcopy")]
        postcopy_after: Option<f64>,
        /// Rate limit of the background pages in postcopy, bytes/s with suffixes (QEMU's `max-postcopy-bandwidth`; 0 = unlimited); requested pages are never held by it.
        #[arg(long = "max-postcopy-bandwidth", value_name = "BYTES_PER_S", default_value = "0", value_parser = parse_size, requires = "postcopy")]
        max_postcopy_bandwidth: u64,
        /// KVM guest: boot this raw firmware image instead of the guest program, as QEMU's `-bios FILE` (read-only below 4 GiB, its last 128 KiB aliased below 1 MiB); one vCPU, one memory slot; verified by RAM equal at arrival and the guest running on.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["slots", "working_set", "dirty_rate", "vcpus", "seed", "postcopy", "capture"])]
        bios: Option<PathBuf>,
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
        /// Fail when a socket read or write makes no progress for this many seconds (TCP keepalive and TCP_USER_TIMEOUT too, on tcp); 0 waits for ever, as QEMU does.
        #[arg(long = "io-timeout", value_name = "SECS", default_value = "30")]
        io_timeout: f64,
        /// ms the guest runs before it is read.
        #[arg(long = "run-on", value_name = "MS", default_value_t = 1000)]
        run_on: u64,
        #[command(flatten)]
        multifd: MultifdArgs,
        /// 4 KiB pages only (no MADV_HUGEPAGE on guest RAM).
        #[arg(long = "no-huge-pages")]
        no_huge_pages: bool,
        /// TLS.
        #[command(flatten)]
        tls: tls_args::TlsArgs,
        /// Capability postcopy-ram: the guest runs from POSTCOPY_RUN on while its pages arrive.
        #[arg(long)]
        postcopy: bool,
        /// A firmware guest: map this image as the source did (read-only below 4 GiB).
        #[arg(long, value_name = "FILE")]
        bios: Option<PathBuf>,
    },
    /// Run the KVM guest as a long-lived VM driven over QMP, like `qemu-system-x86_64 -qmp unix:PATH -incoming defer|URI [-S]`.
    Vm {
        /// The QMP socket: unix:PATH (QEMU's `,server=on,wait=off` options are accepted and implied).
        #[arg(long, value_name = "unix:PATH")]
        qmp: String,
        /// Wait for an incoming migration: `defer` (start it with QMP `migrate-incoming`) or a URI to listen on now.
        #[arg(long, value_name = "defer|URI")]
        incoming: Option<String>,
        /// Do not start the vCPUs until QMP `cont` (QEMU's -S); with --incoming, do not start the guest after loading.
        #[arg(short = 'S')]
        paused: bool,
        /// Guest RAM, suffixes K, M, G.
        #[arg(long = "ram-size", default_value = "1G", value_parser = parse_size)]
        ram_size: u64,
        /// Memory slots, 1 or 2 (2 splits RAM around a PCI hole, scaled down).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
        slots: u32,
        /// vCPUs, each running the guest program on its own slice of the working set.
        #[arg(long, default_value_t = 1)]
        vcpus: usize,
        /// Bytes of the guest's working set (suffixes K, M, G; default a quarter of the RAM, at most 256M).
        #[arg(long = "working-set", value_parser = parse_size)]
        working_set: Option<u64>,
        /// MiB/s the guest writes into its working set.
        #[arg(long = "dirty-rate", value_name = "MIB_PER_S", default_value_t = 64)]
        dirty_rate: u64,
        /// Seed of the working set's content and the guest's page choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The VM's name (QEMU's -name; QMP `query-name`).
        #[arg(long)]
        name: Option<String>,
        /// The VM's UUID (QEMU's -uuid; QMP `query-uuid`).
        #[arg(long, value_parser = parse_uuid)]
        uuid: Option<String>,
    },
    #[command(flatten)]
    Control(agent_cli::ControlCmd),
    /// Receive a migration from a source URI into RAM files; exit 0 only on a complete, checked stream.
    Recv {
        /// RAM block NAME goes to file PATH (created if missing, else its length must match). Repeatable.
        #[arg(long = "ram", value_name = "NAME=PATH", required = true)]
        ram: Vec<String>,
        /// Source: tcp:HOST:PORT (port 0 picks one), unix:PATH, fd:N, exec:COMMAND or file:PATH[,offset=N].
        #[arg(long = "from", value_name = "URI")]
        from: String,
        /// Fail when a socket read or write makes no progress for this many seconds (TCP keepalive and TCP_USER_TIMEOUT too, on tcp); 0 waits for ever, as QEMU does. On tcp: and unix:, a connection that sends nothing within it (or starts with anything but QEMU's magic) is dropped with a line on stderr and recv waits for another.
        #[arg(long = "io-timeout", value_name = "SECS", default_value = "30")]
        io_timeout: f64,
        /// Also write the final statistics to this file.
        #[arg(long = "stats-json", value_name = "PATH")]
        stats_json: Option<PathBuf>,
        #[command(flatten)]
        multifd: MultifdArgs,
        /// QEMU's `-uuid` of the guest (8-4-4-4-12 hex digits), carried in each multifd channel's initial packet: a QEMU 7.2 peer requires its own (libvirt starts QEMU with -uuid). Default all zeros, as QEMU without -uuid.
        #[arg(long = "uuid", value_name = "UUID", value_parser = parse_uuid_bytes, requires = "multifd")]
        uuid: Option<[u8; 16]>,
        /// TLS.
        #[command(flatten)]
        tls: tls_args::TlsArgs,
        /// Capability postcopy-ram: accept a source's switch to postcopy (RAM files on tmpfs).
        #[arg(long = "postcopy")]
        postcopy: bool,
        /// While postcopy is active, read pages not yet received at random (each a real fault), as a vCPU would.
        #[arg(long = "postcopy-touch", requires = "postcopy")]
        postcopy_touch: bool,
    },
}

/// Capability `multifd` and its parameters (QEMU's names, defaults and ranges).
#[derive(clap::Args, Debug, Clone)]
struct MultifdArgs {
    /// Capability `multifd` with N channels (`multifd-channels`, 1..=255; QEMU's default is 2): pages on N extra connections; tcp: and unix: only. Both ends need the same N.
    #[arg(long = "multifd", value_name = "N", value_parser = clap::value_parser!(u8).range(1..))]
    multifd: Option<u8>,
    /// `multifd-compression`: none, zlib or zstd (both ends the same).
    #[arg(long = "multifd-compression", default_value = "none", requires = "multifd")]
    compression: savevm_format::multifd::Compression,
    /// `multifd-zlib-level` (0..=9).
    #[arg(long = "multifd-zlib-level", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=9))]
    zlib_level: u8,
    /// `multifd-zstd-level` (0..=20).
    #[arg(long = "multifd-zstd-level", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=20))]
    zstd_level: u8,
}

impl MultifdArgs {
    /// The multifd parameters set in `p`.
    fn apply(&self, p: &mut engine::params::MigrationParameters) {
        if let Some(n) = self.multifd {
            p.multifd_channels = n;
        }
        p.multifd_compression = self.compression;
        p.multifd_zlib_level = self.zlib_level;
        p.multifd_zstd_level = self.zstd_level;
    }
}

/// QEMU's capability `xbzrle` and parameter `xbzrle-cache-size`.
#[derive(clap::Args)]
struct XbzrleArgs {
    /// QEMU's capability `xbzrle`: after the bulk pass, pages sent again go as deltas against the copy sent last (kept in a cache).
    #[arg(long)]
    xbzrle: bool,
    /// QEMU's `xbzrle-cache-size` in bytes, suffixes K, M, G (a power of two of at least 4K; default 64M).
    #[arg(long = "xbzrle-cache-size", value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    xbzrle_cache_size: u64,
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
    save_stats(path, stats)?;
    print_line(stats);
    Ok(())
}

/// Write the statistics line to `path` when given (`--stats-json`).
fn save_stats(path: Option<&std::path::Path>, stats: &serde_json::Value) -> qmig::Result<()> {
    if let Some(p) = path {
        std::fs::write(p, format!("{stats}\n")).map_err(|e| qmig::Error::file(p, e))?;
    }
    Ok(())
}

/// `1G`, `64M`, `4096`, `512K`.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
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
    xbzrle: bool,
    huge_pages: bool,
    seed: u64,
    run_on: u64,
    stats_json: Option<PathBuf>,
    timeout: Option<qmig::watch::Timeout>,
    channel: transports::ChannelOptions,
    connect: Option<String>,
    multifd: Option<u8>,
    tls: Option<transports::TlsParams>,
    postcopy: Option<std::time::Duration>,
    bios: Option<PathBuf>,
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
        xbzrle: a.xbzrle,
        huge_pages: a.huge_pages,
        seed: a.seed,
        run_on: std::time::Duration::from_millis(a.run_on),
        progress: stdout_is_terminal(),
        timeout: a.timeout,
        channel: a.channel,
        connect: a.connect,
        multifd: a.multifd,
        tls: a.tls,
        postcopy: a.postcopy,
        bios: a.bios,
    };
    let (stats, verified) = kvm_demo::demo(&opts, a.cancel)?;
    write_demo_stats(a.stats_json.as_deref(), &stats)?;
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
    (ram_size, slots, vcpus, huge_pages): (u64, u32, usize, bool),
    (run_on, postcopy): (u64, bool),
    channel: &transports::ChannelOptions,
    multifd: &MultifdArgs,
    (tls, bios): (Option<transports::TlsParams>, Option<&std::path::Path>),
    cancel: &transports::CancelToken,
) -> qmig::Result<()> {
    let run_on = std::time::Duration::from_millis(run_on);
    let mf = multifd.multifd.map(|n| (n, multifd.compression));
    let options = minivmm::VmOptions { huge_pages };
    let report = kvm_demo::dest(
        (ram_size, slots, vcpus),
        options,
        (from, channel),
        (run_on, postcopy, mf),
        (tls.as_ref(), bios),
        cancel,
        |bound| print_line(&serde_json::json!({ "listening": bound.to_string() })),
    )?;
    print_line(&report);
    Ok(())
}

#[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
fn kvm_dest(
    _: &MigrationUri,
    _: (u64, u32, usize, bool),
    _: (u64, bool),
    _: &transports::ChannelOptions,
    _: &MultifdArgs,
    _: (Option<transports::TlsParams>, Option<&std::path::Path>),
    _: &transports::CancelToken,
) -> qmig::Result<()> {
    Err(qmig::Error::Usage(kvm_unavailable().unwrap_or_default()))
}

/// `qmig vm`'s guest.
#[cfg_attr(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")), allow(dead_code))]
struct GuestShape {
    ram_size: u64,
    slots: u32,
    vcpus: usize,
    working_set: u64,
    dirty_rate: u64,
    seed: u64,
    name: Option<String>,
    uuid: Option<String>,
}

/// A UUID as QEMU's -uuid takes it, as its 16 bytes.
fn parse_uuid_bytes(s: &str) -> Result<[u8; 16], String> {
    savevm_format::multifd::parse_uuid(s)
        .ok_or_else(|| format!("{s}: expected a UUID such as 1b4e28ba-2fa1-11d2-883f-0016d3cca427"))
}

/// A UUID as QEMU's -uuid takes it (8-4-4-4-12 hex digits), lowercased.
fn parse_uuid(s: &str) -> Result<String, String> {
    let groups: Vec<&str> = s.split('-').collect();
    let shape = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
    if shape && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit())) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!("{s}: expected a UUID such as 1b4e28ba-2fa1-11d2-883f-0016d3cca427"))
    }
}

#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
fn vm_command(
    qmp: &str,
    incoming: Option<String>,
    paused: bool,
    g: GuestShape,
    cancel: &transports::CancelToken,
) -> qmig::Result<()> {
    // QEMU's `-qmp unix:PATH,server=on,wait=off`: the options are what qmig does anyway.
    let path = qmp
        .strip_prefix("unix:")
        .map(|p| p.split(',').next().unwrap_or(p))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| qmig::Error::Usage(format!("--qmp {qmp}: expected unix:PATH")))?;
    if let Some(why) = kvm_unavailable() {
        return Err(qmig::Error::Usage(format!("qmig vm needs KVM: {why}")));
    }
    let opts = qmig::vm::VmOptions {
        ram_size: g.ram_size,
        slots: g.slots,
        vcpus: g.vcpus,
        guest: minivmm::GuestConfig { working_set: g.working_set, dirty_rate: g.dirty_rate, seed: g.seed },
        paused,
        incoming,
        name: g.name,
        uuid: g.uuid,
    };
    qmig::vm::run(&opts, std::path::Path::new(path), cancel)
}

#[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
fn vm_command(_: &str, _: Option<String>, _: bool, _: GuestShape, _: &transports::CancelToken) -> qmig::Result<()> {
    Err(qmig::Error::Usage(kvm_unavailable().unwrap_or_default()))
}

/// Progress bars and human lines go to a terminal only; a pipe gets the JSON line alone.
pub(crate) fn stdout_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal()
}

/// `--io-timeout SECS`, checked (0: none).
fn channel_options(secs: f64) -> qmig::Result<transports::ChannelOptions> {
    if !(0.0..=1e9).contains(&secs) {
        return Err(qmig::Error::Usage(format!("--io-timeout {secs}: expected seconds, 0 or more")));
    }
    Ok(transports::ChannelOptions::with_io_timeout(Some(std::time::Duration::from_secs_f64(secs))))
}

/// `--timeout SECS --timeout-action ACTION`, checked.
fn deadline(secs: Option<f64>, action: qmig::watch::TimeoutAction) -> qmig::Result<Option<qmig::watch::Timeout>> {
    secs.map(|s| {
        std::time::Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .map(|after| qmig::watch::Timeout { after, action })
            .ok_or_else(|| qmig::Error::Usage(format!("--timeout {s}: expected a positive number of seconds")))
    })
    .transpose()
}

/// The demo's statistics: the JSON line (and the --stats-json file); on a terminal,
/// one human line instead of the JSON on stdout.
fn write_demo_stats(path: Option<&std::path::Path>, stats: &serde_json::Value) -> qmig::Result<()> {
    if !stdout_is_terminal() {
        return write_stats(path, stats);
    }
    save_stats(path, stats)?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", human_line(stats));
    Ok(())
}

/// E.g. `migrated 1.0 GiB live in 1.35 s, 5 passes, downtime 1 ms; guest ran on: counter 111421 -> 186516, checksum ok`.
fn human_line(s: &serde_json::Value) -> String {
    let gib = s["ram"]["total"].as_u64().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    let secs = s["total-time"].as_u64().unwrap_or(0) as f64 / 1000.0;
    let mut line = format!(
        "migrated {gib:.1} GiB live in {secs:.2} s, {} passes, downtime {} ms",
        s["ram"]["dirty-sync-count"],
        s["downtime"].as_u64().unwrap_or(0)
    );
    if let Some(t) = s["cpu-throttle-percentage"].as_u64() {
        line.push_str(&format!(", throttled to {t} %"));
    }
    let g = &s["guest"];
    if g["counter_at_stop"].is_u64() {
        let ok = if g["checksum_ok"] == true { "checksum ok" } else { "CHECKSUM BAD" };
        line.push_str(&format!(
            "; guest ran on: counter {} -> {}, {ok}",
            g["counter_at_stop"], g["counter_on_destination"]
        ));
        if let Some(v) = g["vcpus"].as_array().filter(|v| v.len() > 1) {
            line.push_str(&format!(" ({} vCPUs)", v.len()));
        }
    } else {
        line.push_str(if s["verified"] == true { "; destination RAM equal at stop" } else { "; VERIFICATION FAILED" });
    }
    line
}

pub(crate) fn print_line(v: &serde_json::Value) {
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
        Cmd::Save { guest, out, compress } => {
            let (ram, guest) = guest.parse()?;
            let to = MigrationUri::File { path: out, offset: 0 };
            let opts = SendOptions { runstate: guest.runstate, compress, ..Default::default() };
            let sent = qmig::send::send_all(&ram, &to, &opts, cancel)?;
            let mut stats = sent.info.to_json();
            if let Some(c) = &sent.compressed {
                stats["zstd"] = c.to_json();
            }
            print_line(&stats);
        }
        Cmd::MigrateContinue { control } => {
            qmig::control::execute(&qmig::control::parse_control(&control)?, "migrate-continue", None)?;
        }
        Cmd::MigrateStartPostcopy { control } => {
            qmig::control::execute(&qmig::control::parse_control(&control)?, "migrate-start-postcopy", None)?;
        }
        Cmd::QueryMigrate { control } => {
            print_line(&qmig::control::execute(&qmig::control::parse_control(&control)?, "query-migrate", None)?);
        }
        Cmd::Send {
            guest,
            to,
            max_bandwidth,
            timeout,
            timeout_action,
            return_path,
            no_return_path,
            io_timeout,
            stats_json,
            multifd,
            uuid,
            xbzrle,
            compress,
            tls,
            postcopy,
            postcopy_after,
            pause_before_switchover,
            max_postcopy_bandwidth,
            control,
        } => {
            let (ram, guest) = guest.parse()?;
            let to = uri(&to)?;
            let mut params =
                engine::params::MigrationParameters { max_bandwidth, max_postcopy_bandwidth, ..Default::default() };
            multifd.apply(&mut params);
            let opts = SendOptions {
                runstate: guest.runstate,
                params: engine::params::MigrationParameters { xbzrle_cache_size: xbzrle.xbzrle_cache_size, ..params },
                multifd: multifd.multifd,
                uuid: uuid.unwrap_or_default(),
                xbzrle: xbzrle.xbzrle,
                compress,
                auto_converge: false,
                return_path: if return_path {
                    Some(true)
                } else if no_return_path {
                    Some(false)
                } else {
                    None
                },
                progress: stdout_is_terminal(),
                timeout: deadline(timeout, timeout_action)?,
                channel: channel_options(io_timeout)?,
                tls: tls.params()?,
                postcopy,
                postcopy_after: postcopy_after
                    .map(|s| {
                        std::time::Duration::try_from_secs_f64(s)
                            .map_err(|_| qmig::Error::Usage(format!("--postcopy-after {s}: expected seconds >= 0")))
                    })
                    .transpose()?,
                pause_before_switchover,
                control: control.as_deref().map(qmig::control::parse_control).transpose()?,
            };
            let sent = qmig::send::send_all(&ram, &to, &opts, cancel)?;
            write_stats(stats_json.as_deref(), &sent.to_json())?;
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
            timeout,
            timeout_action,
            auto_converge,
            no_return_path,
            dest,
            seed,
            io_timeout,
            connect,
            stats_json,
            multifd,
            xbzrle,
            no_huge_pages,
            capture,
            tls,
            postcopy,
            postcopy_after,
            max_postcopy_bandwidth,
            bios,
        } => {
            let tls = tls.params()?;
            let channel = channel_options(io_timeout)?;
            let mut params = engine::params::MigrationParameters {
                downtime_limit,
                max_bandwidth,
                max_postcopy_bandwidth,
                xbzrle_cache_size: xbzrle.xbzrle_cache_size,
                ..Default::default()
            };
            multifd.apply(&mut params);
            let (xbzrle, cache_size) = (xbzrle.xbzrle, xbzrle.xbzrle_cache_size);
            engine::params::SharedParameters::new(params.clone())
                .map_err(|e| qmig::Error::Usage(format!("{e} (--xbzrle-cache-size {cache_size})")))?;
            let timeout = deadline(timeout, timeout_action)?;
            let postcopy = match postcopy_after {
                Some(s) if !(s.is_finite() && s >= 0.0) => {
                    return Err(qmig::Error::Usage(format!("--postcopy-after {s}: expected seconds >= 0")))
                }
                Some(s) => Some(std::time::Duration::from_secs_f64(s)),
                // After the first pass (a day is "never" before that).
                None => postcopy.then(|| std::time::Duration::from_secs(86_400)),
            };
            if bios.is_some() && (guest == "synthetic" || dest == "qemu") {
                return Err(qmig::Error::Usage(
                    "--bios boots a KVM guest migrated to a qmig VMM (not --guest synthetic or --dest qemu)".into(),
                ));
            }
            // A firmware guest runs one vCPU in one slot.
            let slots = if bios.is_some() { 1 } else { slots };
            if use_kvm(if kvm || bios.is_some() { "kvm" } else { &guest }, &dest)? {
                if capture.is_some() {
                    return Err(qmig::Error::Usage("--capture is for the synthetic guest (--guest synthetic)".into()));
                }
                let working_set = working_set.unwrap_or_else(|| {
                    let fits = (256 << 20).min(ram_size / 4 / 4096 * 4096).max(4096);
                    if fits < 256 << 20 && bios.is_none() {
                        eprintln!(
                            "qmig demo: working set {} MiB (the default 256 MiB is more than a quarter of {} MiB of RAM)",
                            fits >> 20,
                            ram_size >> 20
                        );
                    }
                    fits
                });
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
                    xbzrle,
                    huge_pages: !no_huge_pages,
                    seed,
                    run_on,
                    stats_json,
                    timeout,
                    channel,
                    connect,
                    multifd: multifd.multifd,
                    tls,
                    postcopy,
                    bios,
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
                return_path: !no_return_path && capture.is_none(),
                xbzrle,
                capture,
                dest: if dest == "qemu" { demo::Destination::Qemu } else { demo::Destination::Qmig },
                seed,
                progress: stdout_is_terminal(),
                timeout,
                postcopy,
                channel,
                connect,
                multifd: multifd.multifd,
                tls,
            };
            let (stats, verified) = demo::demo(&opts, cancel)?;
            write_demo_stats(stats_json.as_deref(), &stats)?;
            if !verified {
                return Err(qmig::Error::Usage(format!(
                    "verification failed: {} pages of the destination differ from the source at stop",
                    stats["differing-pages"]
                )));
            }
        }
        Cmd::KvmDest {
            from,
            ram_size,
            slots,
            vcpus,
            run_on,
            no_huge_pages,
            postcopy,
            io_timeout,
            multifd,
            tls,
            bios,
        } => kvm_dest(
            &uri(&from)?,
            (ram_size, slots, vcpus, !no_huge_pages),
            (run_on, postcopy),
            &channel_options(io_timeout)?,
            &multifd,
            (tls.params()?, bios.as_deref()),
            cancel,
        )?,
        Cmd::Vm { qmp, incoming, paused, ram_size, slots, vcpus, working_set, dirty_rate, seed, name, uuid } => {
            let working_set = working_set.unwrap_or_else(|| (256 << 20).min(ram_size / 4 / 4096 * 4096).max(4096));
            let guest =
                GuestShape { ram_size, slots, vcpus, working_set, dirty_rate: dirty_rate << 20, seed, name, uuid };
            vm_command(&qmp, incoming, paused, guest, cancel)?
        }
        Cmd::Recv { ram, from, io_timeout, stats_json, postcopy, postcopy_touch, multifd, uuid, tls } => {
            let tls = tls.params()?;
            let ram = ram.iter().map(|s| parse_name_path(s)).collect::<qmig::Result<Vec<_>>>()?;
            let from = uri(&from)?;
            let on_listening = |bound: &MigrationUri| {
                if matches!(bound, MigrationUri::Tcp { .. } | MigrationUri::Unix(_)) {
                    print_line(&serde_json::json!({ "listening": bound.to_string() }));
                }
            };
            let channel = channel_options(io_timeout)?;
            let postcopy = postcopy.then(|| engine::postcopy_dest::PostcopyOptions {
                touch: postcopy_touch,
                touch_seed: u64::from(std::process::id()),
            });
            let opts = qmig::recv::RecvOptions {
                progress: stdout_is_terminal(),
                postcopy,
                multifd: multifd.multifd,
                multifd_compression: multifd.compression,
                uuid: uuid.unwrap_or_default(),
                channel,
                tls,
            };
            let st = qmig::recv::recv_opts(&ram, &from, cancel, on_listening, &opts)?;
            write_stats(stats_json.as_deref(), &st.to_json())?;
        }
        Cmd::Control(c) => agent_cli::run(c, cancel)?,
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

/// `--log LEVEL` (or RUST_LOG): the engine's tracing to stderr, never stdout
/// (which carries the JSON).
fn init_logging(level: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log {l}: {e}"))?,
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.is_empty() => EnvFilter::try_new(&v).map_err(|e| format!("RUST_LOG={v}: {e}"))?,
            _ => return Ok(()),
        },
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
    Ok(())
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
    if let Err(e) = init_logging(cli.log.as_deref()) {
        eprintln!("qmig: error: {e}");
        return ExitCode::from(1);
    }
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
            if let qmig::Error::Control { .. } = e {
                // `qmig: migrate: perform3 failed: ...`: the command, then what failed.
                eprintln!("qmig: {e}");
                return ExitCode::from(1);
            }
            eprintln!("qmig: error: {}", e.report());
            ExitCode::from(1)
        }
    }
}
