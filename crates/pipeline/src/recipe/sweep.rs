//! Sweeps: several values where a recipe expects one run every combination, each written as
//! its own image, plus a labelled contact sheet (the X/Y plot people compare settings with).
//!
//! In a `generate` node, a list in `seed`, `steps` or `guidance` is a sweep; so is
//! `{sweep: [...]}` there or in a condition's `scale` (where a plain list already means one
//! value per step). The first swept key runs along the grid's columns, the others down its
//! rows. Each combination is an ordinary recipe with single values, so the PNG it writes
//! re-runs exactly that image with `ipcompose run --from`.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use serde_yaml::Value;

use crate::error::{PipelineError, Result};

/// Keys of a `generate` node where a plain list is a sweep.
pub const LIST_KEYS: [&str; 4] = ["seed", "steps", "guidance", "cfg"];

/// One swept key.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// The generate node it belongs to.
    pub node: String,
    /// Where the value sits below `nodes.NODE.generate` (e.g. `["controls", "0", "scale"]`).
    pub path: Vec<String>,
    /// A short name for labels and file names (`seed`, `ip0.scale`, `control1.scale`).
    pub label: String,
    pub values: Vec<Value>,
}

/// One combination: the recipe with single values and what it chose.
#[derive(Debug, Clone)]
pub struct Combination {
    /// Index into each axis's values.
    pub choice: Vec<usize>,
    /// `label value` per axis.
    pub labels: Vec<String>,
    /// The recipe document with every swept key replaced by the chosen value and every output
    /// of a swept node renamed (`out.png` → `out_seed-1_guidance-5.png`).
    pub document: Value,
}

/// A contact sheet to write once every combination has run.
#[derive(Debug, Clone)]
pub struct Grid {
    pub path: PathBuf,
    /// Per combination (same order as [`Sweep::combinations`]), the image it wrote.
    pub cells: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Sweep {
    pub axes: Vec<Axis>,
    pub combinations: Vec<Combination>,
    pub grids: Vec<Grid>,
}

fn key(name: &str) -> Value {
    Value::String(name.to_string())
}

fn get<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |node, segment| match node {
        Value::Mapping(map) => map.get(key(segment)),
        Value::Sequence(items) => items.get(segment.parse::<usize>().ok()?),
        _ => None,
    })
}

fn get_mut<'a>(value: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |node, segment| match node {
        Value::Mapping(map) => map.get_mut(key(segment)),
        Value::Sequence(items) => items.get_mut(segment.parse::<usize>().ok()?),
        _ => None,
    })
}

/// The values of `{sweep: [...]}`, or an error when the mapping has other keys.
fn sweep_values(value: &Value, place: &str) -> std::result::Result<Option<Vec<Value>>, String> {
    let Value::Mapping(map) = value else {
        return Ok(None);
    };
    let Some(values) = map.get(key("sweep")) else {
        return Ok(None);
    };
    if map.len() != 1 {
        return Err(format!(
            "{place}: `sweep` must be the only key of its mapping"
        ));
    }
    match values {
        Value::Sequence(items) if !items.is_empty() => Ok(Some(items.clone())),
        _ => Err(format!("{place}: `sweep` takes a non-empty list of values")),
    }
}

/// The text of a value for labels and file names (`{ramp: [1, 0]}` → `ramp [1, 0]`).
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Sequence(items) => {
            let items: Vec<String> = items.iter().map(describe).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Mapping(map) => map
            .iter()
            .map(|(k, v)| format!("{} {}", describe(k), describe(v)))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Tagged(tagged) => describe(&tagged.value),
    }
}

/// `describe` reduced to characters safe in a file name.
fn file_part(value: &Value) -> String {
    let text: String = describe(value)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = text.trim_matches('_');
    let mut collapsed = String::new();
    for c in trimmed.chars() {
        if !(c == '_' && collapsed.ends_with('_')) {
            collapsed.push(c);
        }
    }
    collapsed
}

/// Finds the swept keys of every generate node, in recipe order.
pub fn find_axes(document: &Value) -> std::result::Result<Vec<Axis>, String> {
    let mut axes = Vec::new();
    let Some(Value::Mapping(nodes)) = document.get("nodes") else {
        return Ok(axes);
    };
    for (name, node) in nodes {
        let (Some(name), Some(generate)) = (name.as_str(), node.get("generate")) else {
            continue;
        };
        for list_key in LIST_KEYS {
            let Some(value) = generate.get(list_key) else {
                continue;
            };
            let place = format!("nodes.{name}.generate.{list_key}");
            let values = match value {
                Value::Sequence(items) if !items.is_empty() => items.clone(),
                Value::Sequence(_) => return Err(format!("{place}: an empty list sweeps nothing")),
                other => match sweep_values(other, &place)? {
                    Some(values) => values,
                    None => continue,
                },
            };
            let label = if list_key == "cfg" {
                "guidance"
            } else {
                list_key
            };
            axes.push(Axis {
                node: name.to_string(),
                path: vec![list_key.to_string()],
                label: label.to_string(),
                values,
            });
        }
        for (list, short) in [("ip_adapters", "ip"), ("controls", "control")] {
            let Some(Value::Sequence(items)) = generate.get(list) else {
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                let Some(scale) = item.get("scale") else {
                    continue;
                };
                let place = format!("nodes.{name}.generate.{list}.{i}.scale");
                if let Some(values) = sweep_values(scale, &place)? {
                    axes.push(Axis {
                        node: name.to_string(),
                        path: vec![list.to_string(), i.to_string(), "scale".to_string()],
                        label: format!("{short}{i}.scale"),
                        values,
                    });
                }
            }
        }
    }
    Ok(axes)
}

/// Every combination of the axes' values; the first axis varies fastest.
fn choices(axes: &[Axis]) -> Vec<Vec<usize>> {
    let mut all = vec![Vec::new()];
    for axis in axes.iter().rev() {
        all = all
            .into_iter()
            .flat_map(|rest: Vec<usize>| {
                (0..axis.values.len()).map(move |i| {
                    let mut c = rest.clone();
                    c.insert(0, i);
                    c
                })
            })
            .collect();
    }
    // Built with the last axis outermost: rows follow the later axes, columns the first.
    all.sort_by(|a, b| a.iter().rev().cmp(b.iter().rev()));
    all
}

fn renamed(path: &str, suffix: &str) -> String {
    let p = Path::new(path);
    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let name = match p.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{stem}_{suffix}.{ext}"),
        None => format!("{stem}_{suffix}"),
    };
    match p.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join(name).display().to_string(),
        _ => name,
    }
}

/// Expands the document's sweeps; `None` when it has none. `base_dir` resolves output paths.
pub fn expand(document: &Value, base_dir: &Path) -> std::result::Result<Option<Sweep>, String> {
    let axes = find_axes(document)?;
    if axes.is_empty() {
        return Ok(None);
    }
    let swept_nodes: Vec<&str> = axes.iter().map(|a| a.node.as_str()).collect();
    let outputs: Vec<(usize, String, String)> = match document.get("outputs") {
        Some(Value::Sequence(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                let node = o.get("image").or_else(|| o.get("latents"))?.as_str()?;
                let path = o.get("path")?.as_str()?;
                Some((i, node.to_string(), path.to_string()))
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut combinations = Vec::new();
    for (n, choice) in choices(&axes).into_iter().enumerate() {
        let mut doc = document.clone();
        let mut labels = Vec::new();
        let mut suffix_parts = Vec::new();
        for (axis, &i) in axes.iter().zip(&choice) {
            let mut path = vec![
                "nodes".to_string(),
                axis.node.clone(),
                "generate".to_string(),
            ];
            path.extend(axis.path.iter().cloned());
            let slot =
                get_mut(&mut doc, &path).ok_or_else(|| format!("cannot set {}", path.join(".")))?;
            *slot = axis.values[i].clone();
            labels.push(format!("{} {}", axis.label, describe(&axis.values[i])));
            suffix_parts.push(format!("{}-{}", axis.label, file_part(&axis.values[i])));
        }
        let suffix = suffix_parts.join("_");
        if let Some(Value::Sequence(items)) = doc.get_mut("outputs") {
            // Outputs of nodes nobody sweeps are the same in every combination: written once.
            let mut keep = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let Some((_, node, path)) = outputs.iter().find(|(j, _, _)| *j == i) else {
                    keep.push(item.clone());
                    continue;
                };
                if swept_nodes.contains(&node.as_str()) {
                    let mut item = item.clone();
                    if let Some(slot) = get_mut(&mut item, &["path".to_string()]) {
                        *slot = Value::String(renamed(path, &suffix));
                    }
                    keep.push(item);
                } else if n == 0 {
                    keep.push(item.clone());
                }
            }
            *items = keep;
        }
        combinations.push(Combination {
            choice,
            labels,
            document: doc,
        });
    }
    let grids = outputs
        .iter()
        .filter(|(_, node, path)| {
            swept_nodes.contains(&node.as_str())
                && Path::new(path)
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("png"))
        })
        .map(|(i, _, path)| {
            let cells = combinations
                .iter()
                .map(|c| {
                    let written = get(&c.document, &["outputs".into(), i.to_string()])
                        .and_then(|o| o.get("path"))
                        .and_then(Value::as_str)
                        .unwrap_or(path);
                    base_dir.join(written)
                })
                .collect();
            Grid {
                path: base_dir.join(renamed(path, "grid")),
                cells,
            }
        })
        .collect();
    Ok(Some(Sweep {
        axes,
        combinations,
        grids,
    }))
}

impl Sweep {
    /// Column labels (the first axis) and row labels (the other axes combined).
    fn headers(&self) -> (Vec<String>, Vec<String>) {
        let first = &self.axes[0];
        let columns = first
            .values
            .iter()
            .map(|v| format!("{} {}", first.label, describe(v)))
            .collect();
        let columns_count = first.values.len();
        let rows = self
            .combinations
            .chunks(columns_count)
            .map(|row| row[0].labels[1..].join(", "))
            .collect();
        (columns, rows)
    }

    /// Composes the grid from the images the combinations wrote.
    pub fn compose_grid(&self, grid: &Grid) -> Result<RgbImage> {
        let mut cells = Vec::with_capacity(grid.cells.len());
        for path in &grid.cells {
            let image = image::open(path)
                .map_err(|e| PipelineError::Output {
                    path: path.clone(),
                    message: format!("cannot read a sweep image back: {e}"),
                })?
                .to_rgb8();
            cells.push(image);
        }
        let (columns, rows) = self.headers();
        Ok(contact_sheet(&cells, &columns, &rows))
    }
}

const GLYPH: u32 = 8;

/// Draws `text` with the 8x8 public-domain font, `scale` pixels per font pixel.
fn draw_text(canvas: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32) {
    use font8x8::UnicodeFonts;
    for (i, c) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(c)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        let x0 = x + i as u32 * GLYPH * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..GLYPH {
                if bits & (1 << col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (x0 + col * scale + dx, y + row as u32 * scale + dy);
                        if px < canvas.width() && py < canvas.height() {
                            canvas.put_pixel(px, py, Rgb([0, 0, 0]));
                        }
                    }
                }
            }
        }
    }
}

/// Cells in row-major order under column headers and beside row headers, on white.
pub fn contact_sheet(cells: &[RgbImage], columns: &[String], rows: &[String]) -> RgbImage {
    let cell_w = cells.iter().map(RgbImage::width).max().unwrap_or(64);
    let cell_h = cells.iter().map(RgbImage::height).max().unwrap_or(64);
    let scale = (cell_w / 256).clamp(1, 3);
    let pad = 4 * scale;
    let line = GLYPH * scale + 2 * pad;
    let row_label_chars = rows.iter().map(|r| r.chars().count()).max().unwrap_or(0) as u32;
    let left = if row_label_chars == 0 {
        0
    } else {
        row_label_chars * GLYPH * scale + 2 * pad
    };
    let ncols = columns.len().max(1) as u32;
    let nrows = cells.len().div_ceil(ncols as usize) as u32;
    let mut sheet = RgbImage::from_pixel(
        left + ncols * (cell_w + pad) + pad,
        line + nrows * (cell_h + pad) + pad,
        Rgb([255, 255, 255]),
    );
    for (c, label) in columns.iter().enumerate() {
        let x = left + pad + c as u32 * (cell_w + pad);
        draw_text(&mut sheet, x, pad, label, scale);
    }
    for (r, label) in rows.iter().enumerate() {
        let y = line + pad + r as u32 * (cell_h + pad) + cell_h / 2;
        draw_text(
            &mut sheet,
            pad,
            y.saturating_sub(GLYPH * scale / 2),
            label,
            scale,
        );
    }
    for (i, cell) in cells.iter().enumerate() {
        let (c, r) = (i as u32 % ncols, i as u32 / ncols);
        let (x, y) = (
            left + pad + c * (cell_w + pad),
            line + pad + r * (cell_h + pad),
        );
        image::imageops::overlay(&mut sheet, cell, x as i64, y as i64);
    }
    sheet
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    const RECIPE: &str = "version: 1\nnodes:\n  gen:\n    generate:\n      base: b\n      prompt: p\n      seed: [1, 2]\n      guidance: {sweep: [5, 7.5, 9]}\n      controls:\n        - {model: c, image: i, scale: {sweep: [0.5, {ramp: [1, 0]}]}}\n        - {model: c, image: i, scale: [1, 0.5]}\n  edges: {canny: {image: i}}\noutputs:\n  - {image: gen, path: out/gen.png}\n  - {image: edges, path: edges.png}\n";

    #[test]
    fn lists_and_sweep_mappings_become_axes() {
        let axes = find_axes(&doc(RECIPE)).unwrap();
        let labels: Vec<&str> = axes.iter().map(|a| a.label.as_str()).collect();
        // A plain list in a condition's scale is a per-step schedule, not a sweep.
        assert_eq!(labels, ["seed", "guidance", "control0.scale"]);
        assert_eq!(axes[2].values.len(), 2);
    }

    #[test]
    fn every_combination_gets_its_own_outputs_and_one_grid() {
        let sweep = expand(&doc(RECIPE), Path::new("/r")).unwrap().unwrap();
        assert_eq!(sweep.combinations.len(), 2 * 3 * 2);
        let first = &sweep.combinations[0];
        assert_eq!(first.labels, ["seed 1", "guidance 5", "control0.scale 0.5"]);
        let second = &sweep.combinations[1];
        assert_eq!(second.labels[0], "seed 2", "the first axis varies fastest");
        let paths = |c: &Combination| -> Vec<String> {
            c.document["outputs"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|o| o["path"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            paths(first),
            [
                "out/gen_seed-1_guidance-5_control0.scale-0.5.png",
                "edges.png"
            ]
        );
        assert_eq!(paths(second).len(), 1, "unswept outputs are written once");
        let last = sweep.combinations.last().unwrap();
        assert_eq!(
            paths(last),
            ["out/gen_seed-2_guidance-9_control0.scale-ramp_1_0.png"]
        );
        assert_eq!(last.document["nodes"]["gen"]["generate"]["seed"], doc("2"));
        assert_eq!(sweep.grids.len(), 1);
        assert_eq!(sweep.grids[0].path, Path::new("/r/out/gen_grid.png"));
        assert_eq!(sweep.grids[0].cells.len(), 12);
        let (columns, rows) = sweep.headers();
        assert_eq!(columns, ["seed 1", "seed 2"]);
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[0], "guidance 5, control0.scale 0.5");
    }

    #[test]
    fn malformed_sweeps_are_refused() {
        let bad = doc("nodes:\n  g:\n    generate: {seed: {sweep: [1], extra: 2}}\n");
        assert!(find_axes(&bad).unwrap_err().contains("only key"));
        let empty = doc("nodes:\n  g:\n    generate: {steps: []}\n");
        assert!(find_axes(&empty).unwrap_err().contains("empty list"));
        assert!(expand(&doc("version: 1\n"), Path::new("."))
            .unwrap()
            .is_none());
    }

    #[test]
    fn contact_sheet_places_cells_and_labels() {
        let red = RgbImage::from_pixel(16, 16, Rgb([255, 0, 0]));
        let blue = RgbImage::from_pixel(16, 16, Rgb([0, 0, 255]));
        let sheet = contact_sheet(
            &[red.clone(), blue.clone(), blue, red],
            &["a".into(), "b".into()],
            &["x".into(), "y".into()],
        );
        // left band: 1 char (8 px) + 2*4 pad; header band 8 + 2*4.
        let (left, top, pad) = (16, 16, 4);
        assert_eq!(sheet.width(), left + 2 * (16 + pad) + pad);
        assert_eq!(*sheet.get_pixel(left + pad, top + pad), Rgb([255, 0, 0]));
        assert_eq!(
            *sheet.get_pixel(left + pad + 16 + pad, top + pad),
            Rgb([0, 0, 255])
        );
        let dark = sheet.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(dark > 10, "labels are drawn");
    }
}
