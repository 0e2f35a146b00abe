//! The control plane's commands: `qmig agent` (libvirtd's role) and the client
//! commands that talk to agents (virsh's role): `define`, `list`, `destroy`,
//! `migrate`, `migrate-setspeed`, `migrate-cancel`, `jobinfo`.

use clap::Subcommand;
use qmig_control::agent::{Agent, AgentConfig};
use qmig_control::migrate::{run_v3, MigrateFlags, Transport};
use qmig_control::rpc::{Client, RpcError};
use qmig_control::vmproc::Binaries;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use transports::CancelToken;

/// How long a client command waits to reach an agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The control plane's subcommands (flattened into the CLI's).
#[derive(Subcommand)]
pub enum ControlCmd {
    /// Run a host agent (libvirtd's role): VMs by name, libvirt's v3 migration protocol; prints {"listening": "tcp:HOST:PORT"}.
    Agent {
        /// Where the RPC listens: tcp:HOST:PORT (port 0 picks one).
        #[arg(long, value_name = "tcp:HOST:PORT")]
        listen: String,
        /// Where the agent records its VMs and jobs (created if missing); `%STATE%` in VM arguments stands for it.
        #[arg(long = "state-dir", value_name = "DIR")]
        state_dir: PathBuf,
        /// This host's UUID in cookies (default: derived from /etc/machine-id).
        #[arg(long = "host-uuid", value_name = "UUID")]
        host_uuid: Option<String>,
        /// This host's name in cookies (default: the system's).
        #[arg(long, value_name = "NAME")]
        hostname: Option<String>,
    },
    /// Start a VM on an agent: a QEMU 7.2 (--kind qemu) or a `qmig vm` (--kind vm); arguments after `--` go to it.
    Define {
        /// The VM's name (letters, digits, '.', '_', '-').
        name: String,
        /// The agent: tcp:HOST:PORT.
        #[arg(long, value_name = "AGENT")]
        on: String,
        /// qemu (qemu-system-x86_64) or vm (qmig vm).
        #[arg(long, value_parser = ["qemu", "vm"])]
        kind: String,
        /// Guest RAM, suffixes K, M, G.
        #[arg(long = "ram-size", value_parser = crate::parse_size)]
        ram_size: u64,
        /// The VM's UUID (default: a random one).
        #[arg(long)]
        uuid: Option<String>,
        /// Extra arguments for the VM's program; `%STATE%` becomes the agent's state dir on each host.
        #[arg(last = true, value_name = "EXTRA ARGS")]
        extra: Vec<String>,
    },
    /// List an agent's VMs, one JSON line each (name, kind, state, uuid, job; counter and checksum_ok for --kind vm).
    List {
        /// The agent: tcp:HOST:PORT.
        #[arg(long, value_name = "AGENT")]
        on: String,
    },
    /// Kill a VM and forget it.
    Destroy {
        /// The VM's name.
        name: String,
        /// The agent: tcp:HOST:PORT.
        #[arg(long, value_name = "AGENT")]
        on: String,
    },
    /// Migrate a VM between agents with libvirt's v3 protocol (Begin, Prepare, Perform, Finish, Confirm).
    Migrate {
        /// The VM's name.
        name: String,
        /// The source agent: tcp:HOST:PORT.
        #[arg(long, value_name = "AGENT")]
        from: String,
        /// The destination agent: tcp:HOST:PORT.
        #[arg(long, value_name = "AGENT")]
        to: String,
        /// This client talks to both agents (the default).
        #[arg(long, conflicts_with = "p2p")]
        direct: bool,
        /// The source agent talks to the destination agent; this client only to the source.
        #[arg(long)]
        p2p: bool,
        /// Relay the migration stream through the agents (source VM -> its agent -> the
        /// destination agent -> destination VM) instead of VM to VM; needs --p2p, as virsh.
        #[arg(long, requires = "p2p")]
        tunnelled: bool,
        /// Keep the VM running during the migration (else it is paused first, as virsh does).
        #[arg(long)]
        live: bool,
        /// Capability postcopy-ram; switch to postcopy after the first pass.
        #[arg(long)]
        postcopy: bool,
        /// Capability multifd with N channels (multifd-channels).
        #[arg(long, value_name = "N")]
        parallel: Option<u8>,
        /// multifd with multifd-compression zstd (with --parallel's channels, else 2).
        #[arg(long)]
        compressed: bool,
        /// max-bandwidth in MiB/s.
        #[arg(long, value_name = "MiB/s")]
        bandwidth: Option<u64>,
        /// max-postcopy-bandwidth in MiB/s (the background pages once in postcopy).
        #[arg(long = "postcopy-bandwidth", value_name = "MiB/s", requires = "postcopy")]
        postcopy_bandwidth: Option<u64>,
    },
    /// Set a running migration's max-bandwidth (bytes/s, suffixes K, M, G) on its source VM.
    MigrateSetspeed {
        /// The VM's name.
        name: String,
        /// Bytes per second.
        #[arg(value_parser = crate::parse_size)]
        bytes_per_s: u64,
        /// The source agent: tcp:HOST:PORT.
        #[arg(long, value_name = "AGENT")]
        on: String,
    },
    /// Cancel a running migration on its source agent.
    MigrateCancel {
        /// The VM's name.
        name: String,
        /// The source agent: tcp:HOST:PORT.
        #[arg(long, value_name = "AGENT")]
        on: String,
    },
    /// Print a VM's migration job: phase and query-migrate statistics.
    Jobinfo {
        /// The VM's name.
        name: String,
        /// The agent: tcp:HOST:PORT.
        #[arg(long, value_name = "AGENT")]
        on: String,
    },
}

/// `HOST:PORT` or `tcp:HOST:PORT` as `tcp:HOST:PORT`.
fn agent_uri(s: &str) -> String {
    if s.starts_with("tcp:") {
        s.to_string()
    } else {
        format!("tcp:{s}")
    }
}

fn fail(command: &'static str, message: impl std::fmt::Display) -> qmig::Error {
    qmig::Error::Control { command, message: message.to_string() }
}

fn connect(command: &'static str, on: &str) -> qmig::Result<Client> {
    Client::connect(&agent_uri(on), CONNECT_TIMEOUT).map_err(|e| fail(command, e))
}

fn call(command: &'static str, on: &str, call: &str, args: Value) -> qmig::Result<Value> {
    connect(command, on)?.call(call, args).map_err(|e| fail(command, e))
}

/// Runs one control-plane command.
pub fn run(cmd: ControlCmd, cancel: &CancelToken) -> qmig::Result<()> {
    match cmd {
        ControlCmd::Agent { listen, state_dir, host_uuid, hostname } => {
            let qmig = std::env::current_exe().map_err(|e| fail("agent", format!("cannot find qmig itself: {e}")))?;
            let qemu =
                qmig_control::qmp::qemu_binary().unwrap_or_else(|| PathBuf::from(qmig_control::qmp::QEMU_BINARY_NAME));
            let cfg = AgentConfig {
                listen: agent_uri(&listen),
                state_dir,
                host_uuid,
                hostname,
                binaries: Binaries { qemu, qmig },
            };
            let (agent, listener) = Agent::start(&cfg).map_err(|e| fail("agent", e))?;
            crate::print_line(&json!({ "listening": agent.address() }));
            let a = agent.clone();
            std::thread::Builder::new()
                .name("rpc-accept".into())
                .spawn(move || a.serve(listener))
                .map_err(|e| fail("agent", e))?;
            // Until SIGINT/SIGTERM; the VMs keep running (a restarted agent finds them again).
            while !cancel.is_cancelled() {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        }
        ControlCmd::Define { name, on, kind, ram_size, uuid, extra } => {
            let r = call(
                "define",
                &on,
                "define",
                json!({ "name": name, "kind": kind, "ram-size": ram_size, "uuid": uuid, "extra-args": extra }),
            )?;
            crate::print_line(&r);
            Ok(())
        }
        ControlCmd::List { on } => {
            let r = call("list", &on, "list", json!({}))?;
            for vm in r.as_array().into_iter().flatten() {
                crate::print_line(vm);
            }
            Ok(())
        }
        ControlCmd::Destroy { name, on } => {
            call("destroy", &on, "destroy", json!({ "name": name }))?;
            crate::print_line(&json!({ "name": name, "destroyed": true }));
            Ok(())
        }
        ControlCmd::MigrateSetspeed { name, bytes_per_s, on } => {
            call("migrate-setspeed", &on, "migrate-setspeed", json!({ "name": name, "bandwidth": bytes_per_s }))
                .map(drop)
        }
        ControlCmd::MigrateCancel { name, on } => {
            call("migrate-cancel", &on, "migrate-cancel", json!({ "name": name })).map(drop)
        }
        ControlCmd::Jobinfo { name, on } => {
            let r = call("jobinfo", &on, "jobinfo", json!({ "name": name }))?;
            crate::print_line(&r);
            Ok(())
        }
        ControlCmd::Migrate {
            name,
            from,
            to,
            direct: _,
            p2p,
            tunnelled,
            live,
            postcopy,
            parallel,
            compressed,
            bandwidth,
            postcopy_bandwidth,
        } => {
            let flags = MigrateFlags {
                live,
                postcopy,
                parallel,
                compressed,
                bandwidth,
                postcopy_bandwidth,
                transport: if tunnelled { Transport::Tunnelled } else { Transport::Direct },
                p2p,
                paused: false,
            };
            migrate(&name, &agent_uri(&from), &agent_uri(&to), &flags, cancel)
        }
    }
}

/// `qmig migrate`: the v3 protocol from here (direct) or from the source agent (p2p), with a
/// progress bar on a terminal and Ctrl-C turned into `migrate-cancel`.
fn migrate(name: &str, from: &str, to: &str, flags: &MigrateFlags, cancel: &CancelToken) -> qmig::Result<()> {
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (done, cancel, from, name) = (done.clone(), cancel.clone(), from.to_string(), name.to_string());
        let bar = crate::stdout_is_terminal().then(progress_bar);
        std::thread::Builder::new()
            .name("migrate-progress".into())
            .spawn(move || watch(&from, &name, &done, &cancel, bar))
            .map_err(|e| fail("migrate", e))?
    };
    let result = if flags.p2p {
        Client::connect(from, CONNECT_TIMEOUT).map_err(|e| fail("migrate", format!("begin3 failed: {e}"))).and_then(
            |mut c| {
                c.set_timeout(None).map_err(|e| fail("migrate", e))?;
                // The source agent announces each phase as its driver enters it.
                let mut phase = String::from("begin3");
                let args = json!({ "name": name, "to": to, "flags": flags });
                let set = &mut |p: &Value| {
                    if let Some(p) = p["phase"].as_str() {
                        tracing::info!(phase = p, "migrate");
                        phase = p.to_string();
                    }
                };
                match c.call_with_progress("migrate", args, set) {
                    Ok(r) => r.map_err(|e| fail("migrate", e.desc)),
                    // The source agent drove the phases and is gone: name the one it was in.
                    Err(lost) => {
                        Err(fail("migrate", format!("{phase} failed: the source agent was lost: {}", lost.desc)))
                    }
                }
            },
        )
    } else {
        let src = Client::connect(from, CONNECT_TIMEOUT).map_err(|e| fail("migrate", format!("begin3 failed: {e}")));
        let dst = Client::connect(to, CONNECT_TIMEOUT).map_err(|e| fail("migrate", format!("begin3 failed: {e}")));
        src.and_then(|s| dst.map(|d| (s, d))).and_then(|(mut s, mut d)| {
            let _ = s.set_timeout(None);
            let _ = d.set_timeout(None);
            let (s, d) = (Mutex::new(s), Mutex::new(d));
            // The source agent records the destination agent's address (recovery asks it).
            run_v3(&s, &d, name, flags, Some(to), &mut |p| tracing::info!(phase = p, "migrate"))
                .map_err(|e| fail("migrate", e))
        })
    };
    done.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    let summary = result?;
    crate::print_line(&summary);
    Ok(())
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{prefix:>13} [{bar:30}] {bytes}/{total_bytes} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Polls the source agent's `jobinfo` for the bar, and sends `migrate-cancel` once on Ctrl-C.
fn watch(from: &str, name: &str, done: &AtomicBool, cancel: &CancelToken, bar: Option<indicatif::ProgressBar>) {
    let mut client: Option<Client> = None;
    let mut cancel_sent = false;
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        if client.is_none() {
            client = Client::connect(from, CONNECT_TIMEOUT).ok();
        }
        let Some(c) = client.as_mut() else { continue };
        if cancel.is_cancelled() && !cancel_sent {
            cancel_sent = true;
            if let Err(e) = c.call("migrate-cancel", json!({ "name": name })) {
                eprintln!("qmig: migrate: cancel: {e}");
            }
        }
        match c.call("jobinfo", json!({ "name": name })) {
            Ok(j) if j["role"] == "source" && j["finished"] == false => {
                let Some(bar) = bar.as_ref() else { continue };
                let ram = &j["statistics"]["ram"];
                bar.set_prefix(j["phase"].as_str().unwrap_or("").to_string());
                bar.set_length(ram["total"].as_u64().unwrap_or(0));
                bar.set_position(ram["transferred"].as_u64().unwrap_or(0).min(ram["total"].as_u64().unwrap_or(0)));
                let mbps = ram["mbps"].as_f64().unwrap_or(0.0);
                let status = j["statistics"]["status"].as_str().unwrap_or("");
                let remaining = indicatif::HumanBytes(ram["remaining"].as_u64().unwrap_or(0));
                bar.set_message(format!("{status}, {mbps:.0} Mbit/s, {remaining} left"));
            }
            Ok(_) => {}
            Err(RpcError { .. }) => client = None,
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
