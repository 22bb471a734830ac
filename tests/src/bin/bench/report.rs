//! Collects the measurements and prints them as a table with ratios to direct TCP.

use std::fmt::Write as _;
use std::time::Duration;

use crate::procs::Cpu;
use crate::workloads::Direction;

/// Column of each route in the arrays below, and the order of the table's columns.
pub const DIRECT: usize = 0;
/// The Unix socket CONNECT frontend.
pub const UDS: usize = 1;
/// The TLS CONNECT frontend.
pub const TLS: usize = 2;
/// The konnectivity gRPC frontend.
pub const GRPC: usize = 3;
/// The baseline: OpenSSH's reverse dynamic forward, through its SOCKS port.
pub const OPENSSH: usize = 4;
/// How many routes each workload runs over.
pub const ROUTES: usize = 5;

/// The tunnels' columns, each shown with its ratio to direct TCP.
const TUNNELS: [usize; ROUTES - 1] = [UDS, TLS, GRPC, OPENSSH];

/// Heading of each route's column.
const HEADINGS: [&str; ROUTES] = [
    "direct TCP",
    "tunnel, Unix socket",
    "tunnel, TLS",
    "tunnel, gRPC",
    "OpenSSH -R",
];

/// One figure per route.
type PerRoute<T> = [T; ROUTES];

/// Median and 99th percentile of a set of samples.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    p50: Duration,
    p99: Duration,
}

impl Stats {
    /// Percentiles of `samples`, which must not be empty.
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let at = |q: usize| samples[(samples.len() * q / 100).min(samples.len() - 1)];
        Stats {
            p50: at(50),
            p99: at(99),
        }
    }
}

/// Resident memory of the server and agent (KiB) with idle connections held, and the
/// server + agent total before they were opened.
#[derive(Debug, Clone, Copy)]
struct Held {
    server: u64,
    agent: u64,
    before: u64,
}

/// Every measurement of a run; a column per route (direct, Unix socket, TLS, gRPC).
#[derive(Debug, Default)]
pub struct Report {
    single: u64,
    idle: usize,
    streams: usize,
    parallel: u64,
    upload: PerRoute<f64>,
    download: PerRoute<f64>,
    parallel_up: PerRoute<f64>,
    parallel_down: PerRoute<f64>,
    latency: PerRoute<Option<Stats>>,
    dial: PerRoute<f64>,
    dials: usize,
    cpu_upload: PerRoute<Option<Cpu>>,
    cpu_download: PerRoute<Option<Cpu>>,
    cpu_parallel_up: PerRoute<Option<Cpu>>,
    cpu_parallel_down: PerRoute<Option<Cpu>>,
    cpu_dial: PerRoute<Option<Cpu>>,
    cpu_latency: PerRoute<Option<Cpu>>,
    round_trips: usize,
    bulk: PerRoute<Option<(Stats, f64)>>,
    idle_rss: Option<(usize, u64, u64)>,
    held: PerRoute<Option<Held>>,
}

fn rate(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64()
}

impl Report {
    /// An empty report for transfers of `single` bytes and `idle` held connections.
    pub fn new(single: u64, idle: usize) -> Self {
        Report {
            single,
            idle,
            ..Report::default()
        }
    }

    /// RSS (KiB) of a freshly linked server and agent, shown in `column`.
    pub fn idle_rss(&mut self, column: usize, server: u64, agent: u64) {
        self.idle_rss = Some((column, server, agent));
    }

    /// Whether [`Report::idle_rss`] was recorded.
    pub fn has_idle_rss(&self) -> bool {
        self.idle_rss.is_some()
    }

    /// RSS (KiB) with the idle connections held, and the server + agent total before.
    pub fn held(&mut self, column: usize, server: u64, agent: u64, before: u64) {
        self.held[column] = Some(Held {
            server,
            agent,
            before,
        });
    }

    /// A single-stream upload took `took`, and the tunnel `cpu`.
    pub fn upload(&mut self, column: usize, took: Duration, cpu: Option<Cpu>) {
        self.upload[column] = rate(self.single, took);
        self.cpu_upload[column] = cpu;
    }

    /// A single-stream download took `took`, and the tunnel `cpu`.
    pub fn download(&mut self, column: usize, took: Duration, cpu: Option<Cpu>) {
        self.download[column] = rate(self.single, took);
        self.cpu_download[column] = cpu;
    }

    /// `streams` concurrent transfers of `total` bytes in all took `took`, and the tunnel
    /// `cpu`.
    pub fn parallel(
        &mut self,
        column: usize,
        direction: Direction,
        streams: usize,
        total: u64,
        took: Duration,
        cpu: Option<Cpu>,
    ) {
        self.streams = streams;
        self.parallel = total;
        let (slot, cpu_slot) = match direction {
            Direction::Up => (&mut self.parallel_up, &mut self.cpu_parallel_up),
            Direction::Down => (&mut self.parallel_down, &mut self.cpu_parallel_down),
        };
        slot[column] = rate(total, took);
        cpu_slot[column] = cpu;
    }

    /// Round-trip times on an otherwise idle route, and the tunnel `cpu` of all `round_trips`
    /// (warm-up included).
    pub fn latency(&mut self, column: usize, stats: Stats, round_trips: usize, cpu: Option<Cpu>) {
        self.latency[column] = Some(stats);
        self.round_trips = round_trips;
        self.cpu_latency[column] = cpu;
    }

    /// New connections per second, `dials` of them, and the tunnel `cpu` they took.
    pub fn dial_rate(&mut self, column: usize, per_second: f64, dials: usize, cpu: Option<Cpu>) {
        self.dial[column] = per_second;
        self.dials = dials;
        self.cpu_dial[column] = cpu;
    }

    /// Round-trip latency during a bulk upload moving `bulk` bytes per second.
    pub fn under_bulk(&mut self, column: usize, stats: Stats, bulk: f64) {
        self.bulk[column] = Some((stats, bulk));
    }

    /// The table, aligned for a terminal or as Markdown.
    pub fn render(&self, markdown: bool) -> String {
        let rows = self.rows();
        let mut out = String::new();
        if markdown {
            for (i, row) in rows.iter().enumerate() {
                let _ = writeln!(out, "| {} |", row.join(" | "));
                if i == 0 {
                    let rule: Vec<&str> = row
                        .iter()
                        .enumerate()
                        .map(|(c, _)| if c == 0 { "---" } else { "---:" })
                        .collect();
                    let _ = writeln!(out, "|{}|", rule.join("|"));
                }
            }
        } else {
            let columns = rows[0].len();
            let widths: Vec<usize> = (0..columns)
                .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
                .collect();
            for row in &rows {
                let mut line = String::new();
                for (c, cell) in row.iter().enumerate() {
                    let pad = widths[c] - cell.chars().count();
                    if c == 0 {
                        let _ = write!(line, "{cell}{}", " ".repeat(pad));
                    } else {
                        let _ = write!(line, "  {}{cell}", " ".repeat(pad));
                    }
                }
                let _ = writeln!(out, "{}", line.trim_end());
            }
        }
        out
    }

    fn rows(&self) -> Vec<Vec<String>> {
        let mut heading = vec!["measurement".to_owned(), HEADINGS[DIRECT].to_owned()];
        for c in TUNNELS {
            heading.push(HEADINGS[c].to_owned());
            heading.push("vs direct".to_owned());
        }
        heading.push("target".to_owned());
        let mut rows = vec![heading];
        self.throughput_rows(&mut rows);
        self.latency_rows(&mut rows);
        self.cpu_rows(&mut rows);
        self.wake_up_rows(&mut rows);
        self.memory_rows(&mut rows);
        rows
    }

    fn throughput_rows(&self, rows: &mut Vec<Vec<String>>) {
        let size = mib_label(self.single);
        let total = mib_label(self.parallel);
        let streams = self.streams;
        for (name, values, target) in [
            (format!("{size} upload, 1 stream"), &self.upload, "≥ 40 %"),
            (
                format!("{size} download, 1 stream"),
                &self.download,
                "≥ 40 %",
            ),
            (
                format!("{total} upload, {streams} streams"),
                &self.parallel_up,
                "≥ 35 %",
            ),
            (
                format!("{total} download, {streams} streams"),
                &self.parallel_down,
                "≥ 35 %",
            ),
        ] {
            if values[DIRECT] > 0.0 {
                rows.push(compare(name, values, mib_s, percent, target));
            }
        }
    }

    fn latency_rows(&self, rows: &mut Vec<Vec<String>>) {
        if self.latency[DIRECT].is_some() {
            let p50 = self.latency.map(|s| s.map_or(f64::NAN, |s| micros(s.p50)));
            let p99 = self.latency.map(|s| s.map_or(f64::NAN, |s| micros(s.p99)));
            let name = "64 B request/response";
            rows.push(compare(format!("{name} p50"), &p50, us, added, "≤ +40 µs"));
            rows.push(compare(format!("{name} p99"), &p99, us, added, ""));
        }
        if self.dial[DIRECT] > 0.0 {
            let name = "new connections (dial + round trip)";
            rows.push(compare(
                name.into(),
                &self.dial,
                per_second,
                percent,
                "≥ 40 %",
            ));
        }
        if self.bulk[DIRECT].is_none() {
            return;
        }
        // Each column against its own idle latency.
        type Quantile = fn(&Stats) -> Duration;
        let quantiles: [(&str, Quantile, &str); 2] = [
            ("p50 during a bulk upload", |s| s.p50, "≤ 2× idle"),
            ("p99 during a bulk upload", |s| s.p99, ""),
        ];
        for (name, q, target) in quantiles {
            let mut row = vec![name.to_owned()];
            for c in [DIRECT].into_iter().chain(TUNNELS) {
                let busy = self.bulk[c].map_or(f64::NAN, |(s, _)| micros(q(&s)));
                // Without the latency workload (`--only bulk`) there is no idle latency.
                let factor = self.latency[c].map(|s| format!("{:.1}× idle", busy / micros(q(&s))));
                if busy.is_nan() {
                    row.extend(["—".to_owned(), "—".to_owned()]);
                } else if c == DIRECT {
                    row.push(match factor {
                        Some(factor) => format!("{} ({factor})", us(busy)),
                        None => us(busy),
                    });
                } else {
                    row.push(us(busy));
                    row.push(factor.unwrap_or_else(|| "—".to_owned()));
                }
            }
            row.push(target.to_owned());
            rows.push(row);
        }
        let bulk = self.bulk.map(|b| b.map_or(f64::NAN, |(_, rate)| rate));
        rows.push(compare(
            "bulk upload alongside".into(),
            &bulk,
            mib_s,
            percent,
            "",
        ));
    }

    /// CPU time of server + agent per unit of work, each process's share in brackets. Time on
    /// a shared machine is noisy; CPU per unit of work is far steadier.
    fn cpu_rows(&self, rows: &mut Vec<Vec<String>>) {
        let gib = |bytes: u64| bytes as f64 / f64::from(1 << 30);
        let single = gib(self.single);
        let parallel = gib(self.parallel);
        let streams = self.streams;
        let per_gib = "UDS ≤ 1.3 s, TLS ≤ 1.5 s";
        for (name, cpu, gib) in [
            ("CPU per GiB, upload, 1 stream", &self.cpu_upload, single),
            (
                "CPU per GiB, download, 1 stream",
                &self.cpu_download,
                single,
            ),
            (
                &*format!("CPU per GiB, upload, {streams} streams"),
                &self.cpu_parallel_up,
                parallel,
            ),
            (
                &*format!("CPU per GiB, download, {streams} streams"),
                &self.cpu_parallel_down,
                parallel,
            ),
        ] {
            if cpu.iter().any(Option::is_some) {
                let cell = |c: usize| cpu[c].map(|cpu| split(cpu, gib, "s", 1.0, 2));
                rows.push(tunnel_only(
                    format!("{name} (server + agent)"),
                    cell,
                    per_gib,
                ));
            }
        }
        if self.cpu_dial.iter().any(Option::is_some) {
            let dials = self.dials as f64;
            let cell = |c: usize| self.cpu_dial[c].map(|cpu| split(cpu, dials, "µs", 1e6, 0));
            rows.push(tunnel_only(
                "CPU per dial (server + agent)".into(),
                cell,
                "TLS ≤ 300 µs",
            ));
        }
    }

    /// Wake-ups of server + agent per unit of work, each process's share in brackets: threads
    /// that went to sleep and were woken again (voluntary context switches). Beside the bytes'
    /// own work, that is what a tunnel adds to every hop, dearer on an idle machine, whose
    /// CPUs sleep too.
    fn wake_up_rows(&self, rows: &mut Vec<Vec<String>>) {
        let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
        let streams = self.streams;
        for (name, cpu, units) in [
            (
                "wake-ups per MiB, upload, 1 stream".to_owned(),
                &self.cpu_upload,
                mib(self.single),
            ),
            (
                "wake-ups per MiB, download, 1 stream".to_owned(),
                &self.cpu_download,
                mib(self.single),
            ),
            (
                format!("wake-ups per MiB, upload, {streams} streams"),
                &self.cpu_parallel_up,
                mib(self.parallel),
            ),
            (
                format!("wake-ups per MiB, download, {streams} streams"),
                &self.cpu_parallel_down,
                mib(self.parallel),
            ),
            (
                "wake-ups per 64 B round trip".to_owned(),
                &self.cpu_latency,
                self.round_trips as f64,
            ),
            (
                "wake-ups per dial".to_owned(),
                &self.cpu_dial,
                self.dials as f64,
            ),
        ] {
            if cpu.iter().any(Option::is_some) {
                let cell = |c: usize| cpu[c].map(|cpu| wake_ups(cpu, units));
                rows.push(tunnel_only(format!("{name} (server + agent)"), cell, ""));
            }
        }
    }

    fn memory_rows(&self, rows: &mut Vec<Vec<String>>) {
        if self.held.iter().all(Option::is_none) {
            return;
        }
        let idle = self.idle;
        rows.push(tunnel_only(
            "memory per idle connection (server + agent)".into(),
            |c| {
                self.held[c].map(|h| {
                    let grown = (h.server + h.agent).saturating_sub(h.before);
                    format!("{:.1} KiB", grown as f64 / idle as f64)
                })
            },
            "≤ 16 KiB",
        ));
        rows.push(tunnel_only(
            format!("server RSS, {idle} idle connections"),
            |c| self.held[c].map(|h| mib(h.server)),
            "",
        ));
        rows.push(tunnel_only(
            format!("agent RSS, {idle} idle connections"),
            |c| self.held[c].map(|h| mib(h.agent)),
            "",
        ));
        // Measured once, on the first pair started: the frontend makes no difference yet.
        if let Some((column, server, agent)) = self.idle_rss {
            let linked = |kib: u64| move |c: usize| (c == column).then(|| mib(kib));
            rows.push(tunnel_only(
                "server RSS, linked, no connections".into(),
                linked(server),
                "",
            ));
            rows.push(tunnel_only(
                "agent RSS, linked, no connections".into(),
                linked(agent),
                "≤ 10 MiB",
            ));
        }
    }
}

/// A row with each route's value and each tunnel's comparison to direct.
fn compare(
    name: String,
    values: &PerRoute<f64>,
    show: fn(f64) -> String,
    versus: fn(f64, f64) -> String,
    target: &str,
) -> Vec<String> {
    let mut row = vec![name, show(values[DIRECT])];
    for c in TUNNELS {
        // A route that did not run (OpenSSH missing) has no positive figure.
        if values[c] > 0.0 {
            row.push(show(values[c]));
            row.push(versus(values[c], values[DIRECT]));
        } else {
            row.extend(["—".to_owned(), "—".to_owned()]);
        }
    }
    row.push(target.to_owned());
    row
}

/// A row with a figure for some tunnels (`cell` of a column), none for direct TCP and no
/// comparison: a dash where there is nothing to show.
fn tunnel_only(name: String, cell: impl Fn(usize) -> Option<String>, target: &str) -> Vec<String> {
    let dash = || "—".to_owned();
    let mut row = vec![name, dash()];
    for c in TUNNELS {
        row.push(cell(c).unwrap_or_else(dash));
        row.push(dash());
    }
    row.push(target.to_owned());
    row
}

/// `cpu` per unit of work (`units` of it were done), in seconds times `scale` with `digits`
/// decimals, as "total unit (server + agent)".
fn split(cpu: Cpu, units: f64, unit: &str, scale: f64, digits: usize) -> String {
    let per = |d: Duration| d.as_secs_f64() * scale / units;
    let (server, agent) = (per(cpu.server), per(cpu.agent));
    format!(
        "{:.digits$} {unit} ({server:.digits$} + {agent:.digits$})",
        server + agent
    )
}

/// Wake-ups in `cpu` per unit of work (`units` of it were done), as "total (server + agent)".
fn wake_ups(cpu: Cpu, units: f64) -> String {
    let per = |n: u64| n as f64 / units;
    let (server, agent) = (per(cpu.server_wake_ups), per(cpu.agent_wake_ups));
    let digits = if server + agent < 10.0 { 1 } else { 0 };
    format!(
        "{:.digits$} ({server:.digits$} + {agent:.digits$})",
        server + agent
    )
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn mib_label(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

fn mib_s(bytes_per_second: f64) -> String {
    format!("{:.0} MiB/s", bytes_per_second / f64::from(1 << 20))
}

fn per_second(n: f64) -> String {
    format!("{n:.0}/s")
}

fn us(micros: f64) -> String {
    format!("{micros:.1} µs")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn percent(tunnel: f64, direct: f64) -> String {
    format!("{:.0} %", 100.0 * tunnel / direct)
}

fn added(tunnel: f64, direct: f64) -> String {
    format!("{:+.1} µs", tunnel - direct)
}
