//! `detector report` on the lab's trace files kept as fixtures: the index and one page per
//! race with the picture's elements, the Perfetto export, clear errors for bad input, and a
//! headless-Chromium screenshot of a race page checked for the drawn elements.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use detector::postmortem::html::{DELETE, DROP, LIVE_BAR};
use detector::postmortem::perfetto::check_trace_events;

const DETECTOR: &str = env!("CARGO_BIN_EXE_detector");
const RACE: &str = "race-1036781864847-port-reuse-10.78.1.2.42001-10.78.2.2.8080";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/traces")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("detector-report-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn report(args: &[&str]) -> Output {
    Command::new(DETECTOR)
        .arg("report")
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "detector report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_trace_directory_gets_an_index_and_a_page_per_race() {
    let out_dir = scratch("html");
    let out = report(&[
        fixtures().to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    ok(&out);
    let index = std::fs::read_to_string(out_dir.join("index.html")).unwrap();
    let fixtures: Vec<_> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(fixtures.len(), 2);
    for f in &fixtures {
        let page_name = format!("{}.html", f.file_stem().unwrap().to_str().unwrap());
        assert!(
            index.contains(&format!("href=\"{page_name}\"")),
            "{page_name} not linked"
        );
        let page = std::fs::read_to_string(out_dir.join(&page_name)).unwrap();
        // Self-contained: no script, nothing fetched (the only URL is the SVG namespace).
        assert!(!page.contains("<script"));
        assert_eq!(
            page.matches("http").count(),
            1,
            "{page_name} refers to a URL"
        );
        assert!(page.contains("<svg"));
        assert_eq!(page.matches("class=\"entry-bar live-entry\"").count(), 1);
        assert_eq!(page.matches("class=\"entry-bar old-entry\"").count(), 1);
        assert_eq!(
            page.matches("class=\"delete-marker race-delete\"").count(),
            1
        );
        assert_eq!(page.matches("class=\"delete-line\"").count(), 1);
        assert_eq!(page.matches("class=\"drop-marker\"").count(), 4);
        assert_eq!(page.matches("class=\"reuse-gap\"").count(), 1);
        assert!(page.contains("TC_INGRESS"));
        assert!(page.contains("class=\"legend\""));
    }
    assert_eq!(index.matches("<td>port-reuse</td>").count(), 2);
}

#[test]
fn perfetto_export_per_race_is_valid_trace_event_json() {
    let out_dir = scratch("perfetto");
    let out = report(&[
        fixtures().to_str().unwrap(),
        "--format",
        "perfetto",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    ok(&out);
    let files: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    for f in files {
        assert!(f.to_str().unwrap().ends_with(".perfetto.json"), "{f:?}");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let problems = check_trace_events(&v);
        assert!(problems.is_empty(), "{f:?}: {problems:#?}");
        assert!(
            v["traceEvents"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["ph"] == "f")
        );
    }
}

#[test]
fn a_single_file_gets_one_page_next_to_its_out_path() {
    let out_dir = scratch("single");
    let page = out_dir.join("race.html");
    let input = fixtures().join(format!("{RACE}.json"));
    let out = report(&[input.to_str().unwrap(), "--out", page.to_str().unwrap()]);
    ok(&out);
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("10.78.1.2:42001 → 10.78.2.2:8080 TCP"));
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 1);
}

#[test]
fn bad_input_is_named_with_its_problem_and_fails() {
    let dir = scratch("bad");
    std::fs::copy(
        fixtures().join(format!("{RACE}.json")),
        dir.join(format!("{RACE}.json")),
    )
    .unwrap();
    std::fs::write(
        dir.join("race-2-broken.json"),
        "{\"kind\": \"race_trace\", ",
    )
    .unwrap();
    let cases: [(PathBuf, &str); 3] = [
        (dir.clone(), "race-2-broken.json is not a race trace file"),
        (dir.join("nonexistent.json"), "cannot read"),
        (scratch("empty"), "no race trace files"),
    ];
    for (input, want) in cases {
        let out = report(&[
            input.to_str().unwrap(),
            "--out",
            scratch("bad-out").to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{input:?}: {err}");
        assert!(err.contains(want), "{input:?}: want {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // A directory of races with a file name as --out: an error, not a directory named so.
    let good = scratch("good");
    std::fs::copy(
        fixtures().join(format!("{RACE}.json")),
        good.join(format!("{RACE}.json")),
    )
    .unwrap();
    let named = scratch("named-out").join("all.perfetto.json");
    let out = report(&[
        good.to_str().unwrap(),
        "--format",
        "perfetto",
        "--out",
        named.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--out names a directory"), "{err}");
    assert!(!named.exists(), "{named:?} was created");
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn rgb(hex: &str) -> [u8; 3] {
    let n = u32::from_str_radix(hex.trim_start_matches('#'), 16).unwrap();
    [(n >> 16) as u8, (n >> 8) as u8, n as u8]
}

/// Renders `page` headless to a PNG of `width`×`height` at `png`.
pub fn screenshot(chromium: &Path, page: &Path, png: &Path, width: u32, height: u32) {
    let profile = scratch("chromium-profile");
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(
        png.exists(),
        "chromium wrote no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn chromium_shows_bars_the_delete_and_drops() {
    let Some(chromium) = chromium() else {
        if std::env::var_os("DETECTOR_REQUIRE_CHROMIUM").is_some() {
            panic!("chromium is not installed (scripts/setup.sh installs it)");
        }
        eprintln!(
            "SKIPPED: chromium is not installed (apt-get install chromium; scripts/setup.sh does)"
        );
        return;
    };
    let dir = scratch("chromium");
    let page = dir.join("race.html");
    let input = fixtures().join(format!("{RACE}.json"));
    ok(&report(&[
        input.to_str().unwrap(),
        "--out",
        page.to_str().unwrap(),
    ]));
    let png_path = dir.join("race.png");
    screenshot(&chromium, &page, &png_path, 1160, 800);

    let decoder = png::Decoder::new(std::fs::File::open(&png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    assert!(channels >= 3, "{:?}", info.color_type);
    let (w, h) = (info.width as usize, info.height as usize);
    let px = |x: usize, y: usize| {
        let i = (y * w + x) * channels;
        [buf[i], buf[i + 1], buf[i + 2]]
    };
    let non_white = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| px(x, y) != [255, 255, 255])
        .count();
    assert!(
        non_white * 20 > w * h,
        "blank page: {non_white} of {} pixels drawn",
        w * h
    );
    // Count only the chart, above the time axis (a long run of the axis colour), so the
    // legend's swatches of the same colours do not count.
    let axis = rgb("#334155");
    let axis_row = (0..h)
        .find(|&y| (0..w).filter(|&x| px(x, y) == axis).count() > w / 2)
        .expect("no time axis in the screenshot");
    let count = |c: [u8; 3]| {
        (0..axis_row)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .filter(|&(x, y)| px(x, y) == c)
            .count()
    };
    let (bars, delete, drops) = (count(rgb(LIVE_BAR)), count(rgb(DELETE)), count(rgb(DROP)));
    assert!(bars > 5000, "live entry's bar: {bars} pixels");
    assert!(delete > 100, "delete marker: {delete} pixels");
    assert!(drops > 200, "denied packets: {drops} pixels");
}
