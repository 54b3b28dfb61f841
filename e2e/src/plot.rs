//! The downtime-vs-memory plot `make bench` draws (SVG, committed as
//! `docs/downtime.svg` and shown in the README): one line per strategy.

use std::path::Path;

use plotters::prelude::*;

/// One strategy's medians: (memory MiB, milliseconds).
pub struct Series {
    /// Legend.
    pub name: String,
    /// Points.
    pub points: Vec<(f64, f64)>,
}

/// Draws `series` into an SVG at `path`.
pub fn downtime_svg(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let max_x = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let max_y = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..max_x, 0f64..max_y)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("memory of the app (MiB)")
        .y_desc("downtime (ms, median)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let colors = [RED, BLUE, BLACK, GREEN, MAGENTA];
    for (i, s) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// The series of a saved `make bench` output: its `podmig-bench strategy=… mem_mib=…
/// downtime_ms=…` lines, one series per strategy in the order they first appear.
pub fn series_from_bench(output: &str) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
    for line in output.lines().filter(|l| l.starts_with("podmig-bench ")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        };
        let (Some(name), Some(mem), Some(ms)) = (
            field("strategy"),
            field("mem_mib").and_then(|v| v.parse::<f64>().ok()),
            field("downtime_ms").and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        match series.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push((mem, ms)),
            None => series.push(Series {
                name: name.to_owned(),
                points: vec![(mem, ms)],
            }),
        }
    }
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series_with_its_legend() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("d.svg");
        let series = vec![
            Series {
                name: "podmig".into(),
                points: vec![(0.0, 280.0), (1024.0, 2000.0)],
            },
            Series {
                name: "restart".into(),
                points: vec![(0.0, 300.0), (1024.0, 760.0)],
            },
        ];
        downtime_svg(&path, "downtime", &series).expect("svg");
        let svg = std::fs::read_to_string(&path).expect("read");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(
            svg.contains("\npodmig\n") && svg.contains("\nrestart\n"),
            "legend"
        );
    }

    #[test]
    fn a_saved_run_gives_one_series_per_strategy() {
        let out = "machine: raw\npodmig-bench strategy=podmig mem_mib=0 runs=3 downtime_ms=299 frozen_ms=186\n\
                   podmig-bench strategy=lazy mem_mib=0 runs=3 downtime_ms=310 frozen_ms=211\n\
                   podmig-bench strategy=podmig mem_mib=1024 runs=3 downtime_ms=3749 frozen_ms=3650\n\
                   podmig-bench strategy=broken mem_mib=x downtime_ms=1\n";
        let s = series_from_bench(out);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].name.as_str(), s[0].points.clone()),
            ("podmig", vec![(0.0, 299.0), (1024.0, 3749.0)])
        );
        assert_eq!(s[1].points, vec![(0.0, 310.0)]);
    }
}
