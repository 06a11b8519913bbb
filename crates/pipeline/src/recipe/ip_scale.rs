//! Per-layer IP-Adapter scales: one number for every layer, or per block in the InstantStyle
//! form diffusers' `set_ip_adapter_scale` takes (`{down: {block_2: [0, 1]}, up: {block_1:
//! [0, 1, 0]}, mid: 0}`, missing blocks 0), or a named preset.

use std::collections::BTreeMap;

use ipcompose_models::unet::{CrossAttentionLayer, UNetPart};
use serde::Deserialize;

use crate::recipe::schedule::{Strength, STRENGTH_FORMS};

/// `scale:` as written in a recipe: a strength over time (the same forms as every condition,
/// uniform over the layers), a preset, or per-layer values (constant over time).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum ScaleSpec {
    Uniform(f64),
    Time(Strength),
    Preset(String),
    Blocks(BTreeMap<String, BlockScale>),
}

impl<'de> Deserialize<'de> for ScaleSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_yaml::Value::deserialize(d)?;
        if let Some(strength) = Strength::from_value(&value) {
            return match strength.map_err(D::Error::custom)? {
                Strength::Constant(v) => Ok(ScaleSpec::Uniform(v)),
                other => Ok(ScaleSpec::Time(other)),
            };
        }
        match value {
            serde_yaml::Value::String(name) => Ok(ScaleSpec::Preset(name)),
            map @ serde_yaml::Value::Mapping(_) => serde_yaml::from_value(map)
                .map(ScaleSpec::Blocks)
                .map_err(|e| D::Error::custom(format!("per-layer scale: {e}"))),
            _ => Err(D::Error::custom(format!(
                "an IP-Adapter scale must be {STRENGTH_FORMS}, a preset ({}), or per-layer values {{down|mid|up: ...}}",
                PRESETS.join(", ")
            ))),
        }
    }
}

impl ScaleSpec {
    /// The strength over time; per-layer forms are 1 at every active step.
    pub fn strength(&self) -> Strength {
        match self {
            ScaleSpec::Uniform(v) => Strength::Constant(*v),
            ScaleSpec::Time(strength) => strength.clone(),
            ScaleSpec::Preset(_) | ScaleSpec::Blocks(_) => Strength::Constant(1.0),
        }
    }
}

/// A part's value: one number for all its blocks, or per block name.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum BlockScale {
    All(f64),
    PerBlock(BTreeMap<String, LayerScale>),
}

/// A block's value: one number, or one per `attentions.{a}` module.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum LayerScale {
    All(f64),
    PerAttention(Vec<f64>),
}

pub const PRESETS: [&str; 2] = ["style", "style-and-layout"];

/// Resolves `spec` to one scale per cross-attention layer of `layout`.
pub fn resolve_scales(
    spec: &ScaleSpec,
    layout: &[CrossAttentionLayer],
) -> Result<Vec<f64>, String> {
    match spec {
        // Over time the strength multiplies these; exactly 1.0 keeps diffusers' numbers.
        ScaleSpec::Uniform(_) | ScaleSpec::Time(_) => Ok(vec![1.0; layout.len()]),
        ScaleSpec::Preset(name) => resolve_blocks(&preset(name, layout)?, layout),
        ScaleSpec::Blocks(parts) => resolve_blocks(parts, layout),
    }
}

/// InstantStyle's choices, generalised from SDXL's (`up.block_0`, `down.block_2`) to any UNet:
/// style is the middle attention of the first up block with attentions; layout the second
/// attention of the last down block with attentions.
fn preset(
    name: &str,
    layout: &[CrossAttentionLayer],
) -> Result<BTreeMap<String, BlockScale>, String> {
    let first_up = layout
        .iter()
        .filter(|l| l.part == UNetPart::Up)
        .map(|l| l.block)
        .min();
    let last_down = layout
        .iter()
        .filter(|l| l.part == UNetPart::Down)
        .map(|l| l.block)
        .max();
    let attentions = |part: UNetPart, block: usize| {
        layout
            .iter()
            .filter(|l| l.part == part && l.block == block)
            .map(|l| l.attention + 1)
            .max()
            .unwrap_or(0)
    };
    let only = |n: usize, index: usize| {
        LayerScale::PerAttention((0..n).map(|a| if a == index { 1.0 } else { 0.0 }).collect())
    };
    let mut parts = BTreeMap::new();
    let up = first_up.ok_or("this UNet has no up block with attention")?;
    let style = BTreeMap::from([(format!("block_{up}"), only(attentions(UNetPart::Up, up), 1))]);
    parts.insert("up".to_string(), BlockScale::PerBlock(style));
    match name {
        "style" => {}
        "style-and-layout" => {
            let down = last_down.ok_or("this UNet has no down block with attention")?;
            let layout_blocks = BTreeMap::from([(
                format!("block_{down}"),
                only(attentions(UNetPart::Down, down), 1),
            )]);
            parts.insert("down".to_string(), BlockScale::PerBlock(layout_blocks));
        }
        other => {
            return Err(format!(
                "unknown scale preset `{other}` (valid: {}, a number, or {{down|mid|up: ...}})",
                PRESETS.join(", ")
            ))
        }
    }
    Ok(parts)
}

fn resolve_blocks(
    parts: &BTreeMap<String, BlockScale>,
    layout: &[CrossAttentionLayer],
) -> Result<Vec<f64>, String> {
    let mut scales = vec![0.0; layout.len()];
    for (part_name, value) in parts {
        let part = match part_name.as_str() {
            "down" => UNetPart::Down,
            "up" => UNetPart::Up,
            "mid" => UNetPart::Mid,
            other => {
                return Err(format!(
                    "unknown UNet part `{other}` in scale (valid: down, mid, up)"
                ))
            }
        };
        let in_part = |l: &CrossAttentionLayer| l.part == part;
        match value {
            BlockScale::All(v) => {
                for (s, l) in scales.iter_mut().zip(layout) {
                    if in_part(l) {
                        *s = *v;
                    }
                }
            }
            BlockScale::PerBlock(blocks) => {
                if part == UNetPart::Mid {
                    return Err("`mid` takes a single number".to_string());
                }
                for (block_name, layer_scale) in blocks {
                    let block: usize = block_name
                        .strip_prefix("block_")
                        .and_then(|b| b.parse().ok())
                        .ok_or_else(|| format!("`{part_name}.{block_name}`: expected block_N"))?;
                    let attentions = layout
                        .iter()
                        .filter(|l| in_part(l) && l.block == block)
                        .map(|l| l.attention + 1)
                        .max()
                        .ok_or_else(|| {
                            let valid: std::collections::BTreeSet<usize> =
                                layout.iter().filter(|l| in_part(l)).map(|l| l.block).collect();
                            format!("`{part_name}.{block_name}` has no attention layers (blocks with attention: {valid:?})")
                        })?;
                    let per_attention = match layer_scale {
                        LayerScale::All(v) => vec![*v; attentions],
                        LayerScale::PerAttention(v) if v.len() == 1 => vec![v[0]; attentions],
                        LayerScale::PerAttention(v) if v.len() == attentions => v.clone(),
                        LayerScale::PerAttention(v) => {
                            return Err(format!(
                                "`{part_name}.{block_name}` lists {} values; that block has {attentions} attention modules",
                                v.len()
                            ))
                        }
                    };
                    for (s, l) in scales.iter_mut().zip(layout) {
                        if in_part(l) && l.block == block {
                            *s = per_attention[l.attention];
                        }
                    }
                }
            }
        }
    }
    Ok(scales)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipcompose_models::unet::UNetConfig;

    fn sd15_layout() -> Vec<CrossAttentionLayer> {
        let json = r#"{"block_out_channels":[320,640,1280,1280],"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],"layers_per_block":2,"cross_attention_dim":768,"attention_head_dim":8}"#;
        UNetConfig::from_json_str(json, "sd15.json".as_ref())
            .unwrap()
            .cross_attention_layout()
    }

    #[test]
    fn layout_order_is_down_up_mid() {
        let layout = sd15_layout();
        assert_eq!(layout.len(), 16);
        assert_eq!(
            layout[6].name(),
            "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
        );
        assert_eq!(
            layout[15].name(),
            "mid_block.attentions.0.transformer_blocks.0.attn2"
        );
    }

    #[test]
    fn presets_select_instantstyle_blocks() {
        let layout = sd15_layout();
        let style = resolve_scales(&ScaleSpec::Preset("style".into()), &layout).unwrap();
        let on: Vec<String> = layout
            .iter()
            .zip(&style)
            .filter(|(_, s)| **s > 0.0)
            .map(|(l, _)| l.name())
            .collect();
        assert_eq!(on, ["up_blocks.1.attentions.1.transformer_blocks.0.attn2"]);
        let both = resolve_scales(&ScaleSpec::Preset("style-and-layout".into()), &layout).unwrap();
        assert_eq!(both.iter().filter(|s| **s > 0.0).count(), 2);
        assert!(both[5] == 1.0, "down_blocks.2.attentions.1 is layer 5");
        assert!(resolve_scales(&ScaleSpec::Preset("stlye".into()), &layout).is_err());
    }

    #[test]
    fn wrong_list_length_is_explained() {
        let layout = sd15_layout();
        let spec: ScaleSpec = serde_yaml::from_str("{up: {block_1: [0.0, 1.0]}}").unwrap();
        let err = resolve_scales(&spec, &layout).unwrap_err();
        assert!(err.contains("3 attention modules"), "{err}");
    }
}
