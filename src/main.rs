//! The `qmig` command line.

use clap::{Parser, Subcommand};
use qmig::analyze::{analyze, AnalyzeOptions};
use qmig::ramfile::parse_name_path;
use savevm_format::StoppedGuest;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

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
        /// A multifd channel capture belonging to this stream (one file per channel, in channel order). Repeatable.
        #[arg(long = "multifd-channel", value_name = "PATH")]
        multifd_channel: Vec<PathBuf>,
    },
    /// Write the stream of a stopped `-machine none` guest whose RAM blocks are files.
    Save {
        /// RAM block NAME is the file PATH (length a multiple of 4096). Repeatable.
        #[arg(long = "ram", value_name = "NAME=PATH", required = true)]
        ram: Vec<String>,
        /// The stream file to write.
        #[arg(long = "out", value_name = "STREAM")]
        out: PathBuf,
        /// Runstate recorded in `globalstate` (`prelaunch` keeps a `-S` destination in prelaunch).
        #[arg(long, default_value = "prelaunch")]
        runstate: String,
    },
}

fn run(cli: Cli) -> qmig::Result<()> {
    match cli.cmd {
        Cmd::Analyze { stream, extract_ram, multifd_channel } => {
            let extract = extract_ram.iter().map(|s| parse_name_path(s)).collect::<qmig::Result<Vec<_>>>()?;
            let doc = analyze(&stream, &AnalyzeOptions { extract, multifd_channels: multifd_channel })?;
            println!("{doc}");
        }
        Cmd::Save { ram, out, runstate } => {
            if !savevm_format::builtin::RUN_STATES.contains(&runstate.as_str()) {
                return Err(qmig::Error::Usage(format!("unknown runstate '{runstate}'")));
            }
            let ram = ram.iter().map(|s| parse_name_path(s)).collect::<qmig::Result<Vec<_>>>()?;
            let opts = StoppedGuest { runstate, ..Default::default() };
            let total: u64 = ram.iter().map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
            let st = qmig::save::save(&ram, &out, &opts)?;
            println!(
                "{}",
                json!({"status": "completed", "ram": {
                    "transferred": st.transferred, "total": total, "duplicate": st.duplicate,
                    "normal": st.normal, "normal-bytes": st.normal * 4096,
                }})
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qmig: error: {e}");
            ExitCode::from(1)
        }
    }
}
