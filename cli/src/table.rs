//! Aligned tables as kubectl prints them: upper-case headers, columns three spaces apart,
//! `<none>` for an empty cell, and ages and durations in kubectl's short form.

use std::time::Duration;

/// A table being built, row by row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(header: I) -> Self {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, empty cells print `<none>`.
    pub fn row<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, cells: I) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, each line ending in a newline; trailing spaces trimmed.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let cell = |row: &[String], i: usize| -> String {
            match row.get(i).map(String::as_str) {
                None | Some("") => "<none>".to_owned(),
                Some(text) => text.to_owned(),
            }
        };
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, width) in widths.iter_mut().enumerate() {
                *width = (*width).max(cell(row, i).chars().count());
            }
        }
        let mut out = String::new();
        let lines = std::iter::once(self.header.clone()).chain(
            self.rows
                .iter()
                .map(|row| (0..columns).map(|i| cell(row, i)).collect()),
        );
        for line in lines {
            let mut text = String::new();
            for (i, value) in line.iter().enumerate() {
                text.push_str(value);
                if i + 1 < columns {
                    let pad = widths[i] - value.chars().count() + 3;
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// An age as kubectl prints it: `45s`, `3m12s`, `5h4m`, `12d`.
pub fn age(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..10_800 => format!("{}m", s / 60),
        10_800..172_800 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d", s / 86_400),
    }
}

/// A short latency: `850µs`, `12.3ms`, `1.20s`.
pub fn latency(seconds: f64) -> String {
    if seconds < 0.001 {
        format!("{:.0}µs", seconds * 1e6)
    } else if seconds < 1.0 {
        format!("{:.1}ms", seconds * 1e3)
    } else {
        format!("{seconds:.2}s")
    }
}

/// A byte count: `512`, `3.4Ki`, `12.0Mi`, as kubectl prints quantities.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    if n < 1024 {
        return n.to_string();
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_three_spaces_apart_and_empty_cells_say_none() {
        let mut table = Table::new(["SERVER", "AGENT", "STRATEGY"]);
        table.row(["edge-server-1", "node-1", "node"]);
        table.row(["s2", "", "any"]);
        assert_eq!(
            table.render(),
            "SERVER          AGENT    STRATEGY\n\
             edge-server-1   node-1   node\n\
             s2              <none>   any\n"
        );
    }

    #[test]
    fn ages_latencies_and_sizes_read_as_kubectl_prints_them() {
        assert_eq!(age(Duration::from_secs(45)), "45s");
        assert_eq!(age(Duration::from_secs(192)), "3m12s");
        assert_eq!(age(Duration::from_secs(5 * 3600 + 240)), "5h4m");
        assert_eq!(age(Duration::from_secs(12 * 86_400 + 5)), "12d");
        assert_eq!(latency(0.00085), "850µs");
        assert_eq!(latency(0.0123), "12.3ms");
        assert_eq!(latency(1.2), "1.20s");
        assert_eq!(bytes(512), "512");
        assert_eq!(bytes(3482), "3.4Ki");
        assert_eq!(bytes(12 * 1024 * 1024), "12.0Mi");
    }
}
