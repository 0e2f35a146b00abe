//! Options: `--key=value` arguments, else `QMIG_COMPARE_KEY` variables, else the defaults; fills, cases and wires.

use super::*;

/// Content of a guest RAM image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    Random,
    Zero,
    /// One page in four random, the others zero.
    Mixed25,
    /// Words of a 64-word vocabulary (the testdata's `text` pattern): compressible.
    Text,
}

impl Fill {
    pub(crate) fn parse(s: &str) -> Fill {
        match s {
            "random" => Fill::Random,
            "zero" => Fill::Zero,
            "mixed25" | "25" => Fill::Mixed25,
            "text" => Fill::Text,
            _ => panic!("unknown fill '{s}' (expected random, zero, mixed25 or text)"),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Fill::Random => "random",
            Fill::Zero => "zero",
            Fill::Mixed25 => "25% random",
            Fill::Text => "text",
        }
    }

    pub(crate) fn pattern(self) -> Pattern {
        match self {
            Fill::Random => Pattern::Random,
            Fill::Zero => Pattern::Zero,
            Fill::Mixed25 => Pattern::Mixed { every: 4 },
            Fill::Text => Pattern::Text,
        }
    }
}

/// Who sends and who receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    QemuQemu,
    QmigQmig,
    QemuQmig,
    QmigQemu,
}

impl Kind {
    pub(crate) const ALL: [Kind; 4] = [Kind::QemuQemu, Kind::QmigQmig, Kind::QemuQmig, Kind::QmigQemu];

    pub(crate) fn parse(s: &str) -> Kind {
        match s {
            "qemu-qemu" => Kind::QemuQemu,
            "qmig-qmig" => Kind::QmigQmig,
            "qemu-qmig" => Kind::QemuQmig,
            "qmig-qemu" => Kind::QmigQemu,
            _ => panic!("unknown case '{s}' (expected qemu-qemu, qmig-qmig, qemu-qmig or qmig-qemu)"),
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::QemuQemu => "QEMU → QEMU",
            Kind::QmigQmig => "qmig → qmig",
            Kind::QemuQmig => "QEMU → qmig recv",
            Kind::QmigQemu => "qmig send → QEMU",
        }
    }

    pub(crate) fn key(self) -> &'static str {
        match self {
            Kind::QemuQemu => "qemu-qemu",
            Kind::QmigQmig => "qmig-qmig",
            Kind::QemuQmig => "qemu-qmig",
            Kind::QmigQemu => "qmig-qemu",
        }
    }

    pub(crate) fn qemu_src(self) -> bool {
        matches!(self, Kind::QemuQemu | Kind::QemuQmig)
    }

    pub(crate) fn qemu_dst(self) -> bool {
        matches!(self, Kind::QemuQemu | Kind::QmigQemu)
    }
}

/// The transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    Unix,
    Tcp,
}

impl Wire {
    pub(crate) fn parse(s: &str) -> Wire {
        match s {
            "unix" => Wire::Unix,
            "tcp" => Wire::Tcp,
            _ => panic!("unknown wire '{s}' (expected unix or tcp)"),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Wire::Unix => "unix",
            Wire::Tcp => "tcp",
        }
    }
}

/// Capability `multifd` of a row: channels and `multifd-compression` (`None`: off).
pub(crate) type Multifd = Option<(u8, &'static str)>;

/// `off`, `N` or `N:COMPRESSION` (none, zlib, zstd).
pub(crate) fn parse_multifd(s: &str) -> Multifd {
    if s == "off" {
        return None;
    }
    let (n, c) = s.split_once(':').unwrap_or((s, "none"));
    let n: u8 = n.parse().unwrap_or_else(|_| panic!("--multifd={s}: expected off, N or N:COMPRESSION"));
    let c = match c {
        "none" => "none",
        "zlib" => "zlib",
        "zstd" => "zstd",
        _ => panic!("--multifd={s}: compression none, zlib or zstd"),
    };
    Some((n.max(1), c))
}

/// A row's multifd as a label suffix (empty when off).
pub(crate) fn multifd_label(m: Multifd) -> String {
    match m {
        None => String::new(),
        Some((n, "none")) => format!(", multifd {n}"),
        Some((n, c)) => format!(", multifd {n} {c}"),
    }
}

/// The destination RAM file before a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dest {
    /// None: the receiver creates it (sparse).
    Fresh,
    /// An existing file of the right length, all holes (`truncate -s`).
    Sparse,
    /// Memory already populated: a file whose every page was written (zeros) before
    /// `qmig recv` starts; for QEMU a new file with `prealloc=on` on its backend
    /// (QEMU populates it at startup, before the migration).
    Prealloc,
}

impl Dest {
    pub(crate) const ALL: [Dest; 3] = [Dest::Fresh, Dest::Sparse, Dest::Prealloc];

    pub(crate) fn parse(s: &str) -> Dest {
        match s {
            "fresh" => Dest::Fresh,
            "sparse" | "sparse-existing" => Dest::Sparse,
            "prealloc" | "preallocated" => Dest::Prealloc,
            _ => panic!("unknown destination '{s}' (expected fresh, sparse or prealloc)"),
        }
    }

    pub(crate) fn key(self) -> &'static str {
        match self {
            Dest::Fresh => "fresh",
            Dest::Sparse => "sparse-existing",
            Dest::Prealloc => "preallocated",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    First,
    All,
    None,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) quick: bool,
    pub(crate) sizes: Vec<u64>,
    pub(crate) fills: Vec<Fill>,
    pub(crate) kinds: Vec<Kind>,
    pub(crate) wires: Vec<Wire>,
    /// Destination kinds (fresh, sparse-existing, preallocated).
    pub(crate) dests: Vec<Dest>,
    pub(crate) runs: usize,
    pub(crate) limits: bool,
    pub(crate) limit_size: usize,
    pub(crate) verify: Verify,
    pub(crate) json: PathBuf,
    pub(crate) shm: PathBuf,
    pub(crate) qmig: PathBuf,
    pub(crate) qemu: Option<PathBuf>,
    /// Run the live KVM rows.
    pub(crate) live: bool,
    /// Multifd settings, each a set of rows (`off` the plain ones).
    pub(crate) multifd: Vec<Multifd>,
    /// Run the postcopy rows (issue 10).
    pub(crate) postcopy: bool,
    /// Guest RAM of the postcopy rows.
    pub(crate) postcopy_size: u64,
    /// Run the XBZRLE live rows (issue 11).
    pub(crate) xbzrle: bool,
    /// Multifd rows for every fill and wire (`--multifd` given); by default only
    /// for random images over unix, so a full run stays short.
    pub(crate) multifd_everywhere: bool,
}

pub(crate) fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], MIB),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().unwrap_or_else(|_| panic!("'{s}' is not a size like 1G, 64M or 4096"));
    let v = n * mul;
    assert!(v > 0 && v.is_multiple_of(PAGE as u64), "size '{s}' must be a positive multiple of {PAGE}");
    v
}

pub(crate) fn list(s: &str) -> Vec<&str> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).collect()
}

impl Config {
    /// Options from `--key=value` arguments, else `QMIG_COMPARE_KEY`, else the defaults.
    pub(crate) fn parse() -> Config {
        let args: Vec<String> = std::env::args().skip(1).collect();
        // `--help` prints the options; an unknown `--key` is refused (it used to be
        // ignored, so `--help` ran the quick matrix).
        const KEYS: [&str; 16] = [
            "quick",
            "sizes",
            "fills",
            "cases",
            "wires",
            "dests",
            "runs",
            "verify",
            "limits",
            "json",
            "shm",
            "multifd",
            "live",
            "postcopy",
            "postcopy-size",
            "xbzrle",
        ];
        let usage = || {
            format!(
                "usage: cargo bench --bench compare -- [--KEY=VALUE]...\nkeys (or QMIG_COMPARE_KEY variables): {}\n\
                 each is described at the top of benches/compare/main.rs",
                KEYS.map(|k| format!("--{k}")).join(" ")
            )
        };
        if args.iter().any(|a| a == "--help" || a == "-h") {
            println!("{}", usage());
            std::process::exit(0);
        }
        for a in args.iter().filter_map(|a| a.strip_prefix("--")) {
            let key = a.split('=').next().unwrap_or(a);
            // `--bench` is cargo's; libtest's flags (`cargo test --benches -- ...`) are let through.
            const PASSED: [&str; 8] =
                ["bench", "nocapture", "quiet", "show-output", "exact", "ignored", "include-ignored", "test-threads"];
            if !KEYS.contains(&key) && !PASSED.contains(&key) && !key.is_empty() {
                panic!("unknown option --{key}\n{}", usage());
            }
        }
        let arg = |key: &str| -> Option<String> {
            let flag = format!("--{key}");
            let prefix = format!("--{key}=");
            let mut it = args.iter();
            while let Some(a) = it.next() {
                if let Some(v) = a.strip_prefix(&prefix) {
                    return Some(v.to_string());
                }
                if *a == flag {
                    return Some(it.next().filter(|v| !v.starts_with("--")).cloned().unwrap_or_else(|| "1".into()));
                }
            }
            let env = format!("QMIG_COMPARE_{}", key.to_uppercase());
            std::env::var(env).ok()
        };
        let on = |v: &str| !matches!(v, "0" | "false" | "no" | "off");
        // `cargo bench` passes --bench; `cargo test --benches` does not: a smoke run then.
        let quick = arg("quick").map(|v| on(&v)).unwrap_or(false) || !args.iter().any(|a| a == "--bench");
        let sizes = match arg("sizes") {
            Some(v) => list(&v).into_iter().map(parse_size).collect(),
            None if quick => vec![64 * MIB],
            None => vec![1 << 30, 4 << 30],
        };
        let fills = arg("fills").map_or_else(
            || vec![Fill::Random, Fill::Zero, Fill::Mixed25, Fill::Text],
            |v| list(&v).into_iter().map(Fill::parse).collect(),
        );
        let kinds =
            arg("cases").map_or_else(|| Kind::ALL.to_vec(), |v| list(&v).into_iter().map(Kind::parse).collect());
        let wires = arg("wires")
            .map_or_else(|| vec![Wire::Unix, Wire::Tcp], |v| list(&v).into_iter().map(Wire::parse).collect());
        let dests =
            arg("dests").map_or_else(|| Dest::ALL.to_vec(), |v| list(&v).into_iter().map(Dest::parse).collect());
        let runs = arg("runs").map_or(if quick { 1 } else { 5 }, |v| {
            v.parse::<usize>().unwrap_or_else(|_| panic!("--runs={v}: not a number")).max(1)
        });
        let verify = match arg("verify").as_deref() {
            None | Some("first") => Verify::First,
            Some("all") => Verify::All,
            Some("none") => Verify::None,
            Some(v) => panic!("--verify={v}: expected first, all or none"),
        };
        let qmig = std::env::var_os("QMIG_COMPARE_QMIG")
            .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qmig")), PathBuf::from);
        // target/release/qmig -> target/compare.json (a smoke run must not replace a real one)
        let name = if quick { "compare-quick.json" } else { "compare.json" };
        let default_json = Path::new(env!("CARGO_BIN_EXE_qmig"))
            .parent()
            .and_then(Path::parent)
            .map_or_else(|| PathBuf::from(name), |t| t.join(name));
        Config {
            quick,
            sizes,
            fills,
            kinds,
            wires,
            dests,
            runs,
            limits: arg("limits").map(|v| on(&v)).unwrap_or(true),
            live: arg("live").map(|v| on(&v)).unwrap_or(true),
            postcopy: arg("postcopy").map(|v| on(&v)).unwrap_or(true),
            postcopy_size: arg("postcopy-size").map_or(if quick { 64 * MIB } else { 1 << 30 }, |v| parse_size(&v)),
            xbzrle: arg("xbzrle").map(|v| on(&v)).unwrap_or(true),
            multifd_everywhere: arg("multifd").is_some(),
            // Full runs add multifd rows (2 and 4 channels, none and zstd); a smoke run only when asked.
            multifd: arg("multifd").map_or_else(
                || {
                    if quick {
                        vec![None]
                    } else {
                        ["off", "2", "4", "2:zstd", "4:zstd"].into_iter().map(parse_multifd).collect()
                    }
                },
                |v| list(&v).into_iter().map(parse_multifd).collect(),
            ),
            limit_size: if quick { 256 << 20 } else { 1 << 30 },
            verify,
            json: arg("json").map_or(default_json, PathBuf::from),
            shm: arg("shm").map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from),
            qmig,
            qemu: qemu_binary(),
        }
    }
}
