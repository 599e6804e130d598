//! The boot-time chart: two panels over boot memory (log scale), the boot
//! memmap's time and the struct pages it wrote (log scale), a line per
//! profile, solid with gigantic pages pre-optimized and dashed with the
//! same memory as ordinary pages.

use std::fmt::Write as _;

use hvo_harness::scenario::Size;
use hvo_images::Arch;

use super::boot_time::BootFigures;

const COLORS: [&str; 4] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759"];
const LEFT: f64 = 80.0;
const WIDTH: f64 = 520.0;
const PANEL: f64 = 220.0;

/// A log-scale axis over the values it must show, widened to whole decades
/// (or powers of two for memory).
struct LogAxis {
    lo: f64,
    hi: f64,
}

impl LogAxis {
    fn over(values: impl Iterator<Item = f64>, base: f64) -> LogAxis {
        let (lo, hi) = values.filter(|v| *v > 0.0).fold((f64::MAX, 1.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let lo = base.powf(lo.min(hi).log(base).floor());
        let hi = base.powf(hi.log(base).ceil()).max(lo * base);
        LogAxis { lo, hi }
    }

    /// Where `v` falls, 0 at `lo` to 1 at `hi`.
    fn at(&self, v: f64) -> f64 {
        (v.max(self.lo).ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln())
    }

    /// Its ticks: every power of `base` from `lo` to `hi`.
    fn ticks(&self, base: f64) -> Vec<f64> {
        let mut t = Vec::new();
        let mut v = self.lo;
        while v <= self.hi * 1.0001 {
            t.push(v);
            v *= base;
        }
        t
    }
}

fn panel(
    out: &mut String,
    top: f64,
    title: &str,
    table: &[(Arch, Vec<BootFigures>)],
    x: &LogAxis,
    value: fn(&BootFigures) -> f64,
) {
    let y = LogAxis::over(table.iter().flat_map(|(_, rows)| rows.iter().map(value)), 10.0);
    let px = |m: f64| LEFT + x.at(m) * WIDTH;
    let py = |v: f64| top + PANEL - y.at(v) * PANEL;
    let _ = writeln!(out, "<text x=\"{LEFT}\" y=\"{}\" font-size=\"13\">{title}</text>", top - 8.0);
    let _ = writeln!(
        out,
        "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{WIDTH}\" height=\"{PANEL}\" fill=\"none\" stroke=\"#999\"/>"
    );
    for t in y.ticks(10.0) {
        let label = if t >= 1e6 {
            format!("{:.0}M", t / 1e6)
        } else if t >= 1e3 {
            format!("{:.0}k", t / 1e3)
        } else {
            format!("{t:.0}")
        };
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            LEFT + WIDTH,
            LEFT - 6.0,
            py(t) + 4.0,
            yy = py(t)
        );
    }
    for (k, (arch, rows)) in table.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        for (pre_optimized, dash) in [(true, ""), (false, " stroke-dasharray=\"5,4\"")] {
            let points: Vec<&BootFigures> = rows.iter().filter(|r| (r.gigantic_pages > 0) == pre_optimized).collect();
            let line: Vec<String> =
                points.iter().map(|r| format!("{:.1},{:.1}", px(r.boot_memory as f64), py(value(r)))).collect();
            let _ = writeln!(
                out,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>",
                line.join(" ")
            );
            for r in points {
                let _ = writeln!(
                    out,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"><title>{arch} {} {}: {:.0}</title></circle>",
                    px(r.boot_memory as f64),
                    py(value(r)),
                    Size(r.boot_memory),
                    if pre_optimized { "pre-optimized" } else { "ordinary" },
                    value(r)
                );
            }
        }
    }
}

pub(super) fn chart(table: &[(Arch, Vec<BootFigures>)]) -> String {
    let x = LogAxis::over(table.iter().flat_map(|(_, rows)| rows.iter().map(|r| r.boot_memory as f64)), 2.0);
    let height = 40.0 + 2.0 * (PANEL + 50.0) + 50.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        LEFT + WIDTH + 30.0
    );
    panel(&mut out, 40.0, "boot memmap (vmemmap population and memmap init), ms", table, &x, |r| r.boot_memmap_ms);
    panel(&mut out, 40.0 + PANEL + 50.0, "struct pages written at boot", table, &x, |r| r.struct_pages_written as f64);
    let axis_y = 40.0 + 2.0 * PANEL + 50.0 + 16.0;
    for t in x.ticks(4.0) {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{axis_y}\" text-anchor=\"middle\">{}</text>",
            LEFT + x.at(t) * WIDTH,
            Size(t as u64)
        );
    }
    let legend_y = height - 12.0;
    for (k, (arch, _)) in table.iter().enumerate() {
        let lx = LEFT + k as f64 * 110.0;
        let _ = writeln!(
            out,
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{legend_y}\">{arch}</text>",
            lx + 18.0,
            legend_y - 4.0,
            legend_y - 4.0,
            COLORS[k % COLORS.len()],
            lx + 22.0
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{LEFT}\" y=\"{}\">solid: gigantic pages pre-optimized; dashed: the same memory as ordinary pages; x: boot memory</text>",
        legend_y - 22.0
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(gib: u64, gigantic: bool, ms: f64, written: u64) -> BootFigures {
        BootFigures {
            boot_memory: gib << 30,
            gigantic_pages: if gigantic { gib - 2 } else { 0 },
            boot_memmap_ms: ms,
            struct_pages_written: written,
            vmemmap_ptes: 0,
            runs: 1,
        }
    }

    #[test]
    fn a_line_per_profile_and_kind_with_a_point_per_machine() {
        let rows =
            vec![row(64, true, 200.0, 528_000), row(64, false, 1500.0, 16_777_216), row(970, true, 3000.0, 2_700_000)];
        let svg = chart(&[(Arch::X86_64, rows)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4, "two panels, pre-optimized and ordinary each");
        assert_eq!(svg.matches("<circle").count(), 6);
        assert!(svg.contains("x86_64 970G pre-optimized: 3000"));
    }

    #[test]
    fn log_axes_cover_their_values_in_whole_steps() {
        let a = LogAxis::over([16.0 * 1024.0, 970.0 * 1024.0].into_iter(), 2.0);
        assert!(a.lo <= 16.0 * 1024.0 && a.hi >= 970.0 * 1024.0);
        assert!((a.at(a.lo) - 0.0).abs() < 1e-9 && (a.at(a.hi) - 1.0).abs() < 1e-9);
    }
}
