//! The OpenPose body network (`bodypose_model` of controlnet_aux 0.0.10 / pytorch-openpose):
//! the first ten VGG-19 convolutions and two CPM convolutions, then six stages of two branches,
//! L1 (part-affinity fields, 38 channels) and L2 (heatmaps, 19 channels). Loaded from the
//! `body_pose_model.pth` users download (lllyasviel/Annotators), by its original tensor names
//! (`conv1_1.weight`, `conv5_5_CPM_L1.bias`, `Mconv7_stage6_L2.weight`, …; controlnet_aux's
//! `transfer` adds the `model0.`-style prefixes only for its `nn.Sequential` layout).
//!
//! As in controlnet_aux, `Mconv7_stage6_L2` (the final heatmaps) is followed by a ReLU: its
//! `no_relu_layers` list names `Mconv7_stage6_L1` twice and `Mconv7_stage6_L2` not at all.
//!
//! `ipcompose_preprocess::pose` runs the whole annotator around it: resizing, post-processing
//! and drawing.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Conv2dConfig, Module, VarBuilder};

use crate::error::{ModelError, Result};

/// Channels of the part-affinity output (`Mconv7_stage6_L1`): 19 limbs × (x, y).
pub const PAF_CHANNELS: usize = 38;
/// Channels of the heatmap output (`Mconv7_stage6_L2`): 18 parts and the background.
pub const HEATMAP_CHANNELS: usize = 19;
use crate::unet::im2col::PlainConv;
use crate::weights::WeightStore;

/// Channel widths of the body network; [`BodyPoseConfig::default`] is the real model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyPoseConfig {
    /// Outputs of `conv1_*`, `conv2_*`, `conv3_*`, `conv4_1`/`conv4_2`.
    pub vgg_channels: [usize; 4],
    /// Outputs of `conv4_3_CPM` and `conv4_4_CPM` (the latter is the feature width every stage
    /// sees again).
    pub cpm_channels: [usize; 2],
    /// Outputs of `conv5_1..3_CPM_L*`.
    pub stage1_hidden: usize,
    /// Output of `conv5_4_CPM_L*`.
    pub stage1_expand: usize,
    /// Outputs of `Mconv1..6_stage*_L*`.
    pub refine_channels: usize,
    pub paf_channels: usize,
    pub heatmap_channels: usize,
}

impl Default for BodyPoseConfig {
    fn default() -> Self {
        Self {
            vgg_channels: [64, 128, 256, 512],
            cpm_channels: [256, 128],
            stage1_hidden: 128,
            stage1_expand: 512,
            refine_channels: 128,
            paf_channels: PAF_CHANNELS,
            heatmap_channels: HEATMAP_CHANNELS,
        }
    }
}

impl BodyPoseConfig {
    /// The narrow preset of the test fixture (`tests/fixtures/make_pose_fixtures.py`).
    pub fn tiny() -> Self {
        Self {
            vgg_channels: [8, 8, 8, 8],
            cpm_channels: [8, 8],
            stage1_hidden: 8,
            stage1_expand: 16,
            refine_channels: 8,
            ..Self::default()
        }
    }

    /// Reads the widths from the tensor shapes of a weight file (no data is loaded).
    fn from_store(store: &WeightStore, path: &Path, layout: Layout) -> Result<Self> {
        let out = |name: &str| -> Result<usize> {
            store
                .shape(&layout.name(&format!("{name}.weight")))
                .filter(|s| s.len() == 4)
                .map(|s| s[0])
                .ok_or_else(|| ModelError::Config {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor `{name}.weight` is missing or not a 4-d convolution weight"
                    ),
                })
        };
        Ok(Self {
            vgg_channels: [
                out("conv1_1")?,
                out("conv2_1")?,
                out("conv3_1")?,
                out("conv4_1")?,
            ],
            cpm_channels: [out("conv4_3_CPM")?, out("conv4_4_CPM")?],
            stage1_hidden: out("conv5_1_CPM_L1")?,
            stage1_expand: out("conv5_4_CPM_L1")?,
            refine_channels: out("Mconv1_stage2_L1")?,
            paf_channels: out("conv5_5_CPM_L1")?,
            heatmap_channels: out("conv5_5_CPM_L2")?,
        })
    }
}

/// How the tensors of a file are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `body_pose_model.pth`: `conv1_1.weight`, `Mconv7_stage6_L2.bias`, …
    Original,
    /// controlnet_aux's `bodypose_model().state_dict()`: `model0.conv1_1.weight`,
    /// `model6_2.Mconv7_stage6_L2.bias`, … (what `util.transfer` maps the original names to).
    Module,
}

impl Layout {
    fn name(self, original: &str) -> String {
        match self {
            Layout::Original => original.to_string(),
            Layout::Module => module_name(original),
        }
    }
}

/// The `nn.Sequential` block controlnet_aux keeps a layer in.
fn module_name(original: &str) -> String {
    let layer = original.split('.').next().unwrap_or(original);
    let branch = if layer.ends_with("_L1") { 1 } else { 2 };
    let block = if let Some(rest) = layer.strip_prefix("Mconv") {
        let stage = rest
            .split("_stage")
            .nth(1)
            .and_then(|s| s.chars().next())
            .unwrap_or('0');
        format!("model{stage}_{branch}")
    } else if layer.starts_with("conv5_") {
        format!("model1_{branch}")
    } else {
        "model0".to_string()
    };
    format!("{block}.{original}")
}

/// Tensor names every OpenPose body model has and other models (the hand model, UNets) lack.
const SIGNATURE: [&str; 3] = [
    "conv4_4_CPM.weight",
    "conv5_5_CPM_L1.weight",
    "Mconv7_stage6_L2.weight",
];

struct Layer {
    /// The 3×3 and 7×7 layers take the im2col kernel on f32 CPU tensors (candle's tiled conv2d
    /// made the network 4x torch's time); 1×1 layers and everything else take candle's conv2d.
    conv: PlainConv,
    relu: bool,
}

fn layer(
    vb: &VarBuilder,
    name: &str,
    cin: usize,
    cout: usize,
    k: usize,
    relu: bool,
) -> Result<Layer> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        ..Default::default()
    };
    let conv = PlainConv::new(candle_nn::conv2d(cin, cout, k, cfg, vb.pp(name))?)?;
    Ok(Layer { conv, relu })
}

enum Step {
    Conv(Layer),
    Pool,
}

fn run(steps: &[Step], x: &Tensor) -> Result<Tensor> {
    let mut x = x.clone();
    for step in steps {
        x = match step {
            Step::Conv(l) => {
                let y = l.conv.forward(&x)?;
                if l.relu {
                    y.relu()?
                } else {
                    y
                }
            }
            Step::Pool => x.max_pool2d(2)?,
        };
    }
    Ok(x)
}

/// The body network.
pub struct BodyPoseModel {
    backbone: Vec<Step>,
    /// `[stage][branch]`, stage 0 is the CPM stage (`conv5_*`), branch 0 is L1 (PAFs).
    stages: Vec<[Vec<Step>; 2]>,
    config: BodyPoseConfig,
    device: Device,
}

impl BodyPoseModel {
    pub fn new(vb: VarBuilder, config: &BodyPoseConfig) -> Result<Self> {
        let [c1, c2, c3, c4] = config.vgg_channels;
        let [cpm3, feat] = config.cpm_channels;
        let conv = |name: &str, cin, cout, k, relu| -> Result<Step> {
            Ok(Step::Conv(layer(&vb, name, cin, cout, k, relu)?))
        };
        let backbone = vec![
            conv("conv1_1", 3, c1, 3, true)?,
            conv("conv1_2", c1, c1, 3, true)?,
            Step::Pool,
            conv("conv2_1", c1, c2, 3, true)?,
            conv("conv2_2", c2, c2, 3, true)?,
            Step::Pool,
            conv("conv3_1", c2, c3, 3, true)?,
            conv("conv3_2", c3, c3, 3, true)?,
            conv("conv3_3", c3, c3, 3, true)?,
            conv("conv3_4", c3, c3, 3, true)?,
            Step::Pool,
            conv("conv4_1", c3, c4, 3, true)?,
            conv("conv4_2", c4, c4, 3, true)?,
            conv("conv4_3_CPM", c4, cpm3, 3, true)?,
            conv("conv4_4_CPM", cpm3, feat, 3, true)?,
        ];
        let outs = [config.paf_channels, config.heatmap_channels];
        let mut stages = Vec::with_capacity(6);
        let mut first: Vec<Vec<Step>> = Vec::new();
        for (b, &out) in outs.iter().enumerate() {
            let l = format!("L{}", b + 1);
            let (h, e) = (config.stage1_hidden, config.stage1_expand);
            first.push(vec![
                conv(&format!("conv5_1_CPM_{l}"), feat, h, 3, true)?,
                conv(&format!("conv5_2_CPM_{l}"), h, h, 3, true)?,
                conv(&format!("conv5_3_CPM_{l}"), h, h, 3, true)?,
                conv(&format!("conv5_4_CPM_{l}"), h, e, 1, true)?,
                conv(&format!("conv5_5_CPM_{l}"), e, out, 1, false)?,
            ]);
        }
        let mut it = first.into_iter();
        stages.push([it.next().unwrap_or_default(), it.next().unwrap_or_default()]);
        let cin = config.paf_channels + config.heatmap_channels + feat;
        let r = config.refine_channels;
        for s in 2..=6 {
            let mut pair: Vec<Vec<Step>> = Vec::new();
            for (b, &out) in outs.iter().enumerate() {
                let l = format!("L{}", b + 1);
                // controlnet_aux's no_relu_layers misses Mconv7_stage6_L2.
                let last_relu = s == 6 && b == 1;
                pair.push(vec![
                    conv(&format!("Mconv1_stage{s}_{l}"), cin, r, 7, true)?,
                    conv(&format!("Mconv2_stage{s}_{l}"), r, r, 7, true)?,
                    conv(&format!("Mconv3_stage{s}_{l}"), r, r, 7, true)?,
                    conv(&format!("Mconv4_stage{s}_{l}"), r, r, 7, true)?,
                    conv(&format!("Mconv5_stage{s}_{l}"), r, r, 7, true)?,
                    conv(&format!("Mconv6_stage{s}_{l}"), r, r, 1, true)?,
                    conv(&format!("Mconv7_stage{s}_{l}"), r, out, 1, last_relu)?,
                ]);
            }
            let mut it = pair.into_iter();
            stages.push([it.next().unwrap_or_default(), it.next().unwrap_or_default()]);
        }
        Ok(Self {
            backbone,
            stages,
            config: config.clone(),
            device: vb.device().clone(),
        })
    }

    /// Loads `body_pose_model.pth` (zip or legacy torch format, or a safetensors file with
    /// the same names; controlnet_aux's own `model0.conv1_1.weight` naming is accepted too),
    /// reading the channel widths from the file. A file that is not an OpenPose body model is refused with
    /// a message naming it.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (store, layout, config) = open_checked(path)?;
        let vb = store.var_builder(DType::F32, device);
        let vb = match layout {
            Layout::Original => vb,
            Layout::Module => vb.rename_f(module_name),
        };
        Self::new(vb, &config)
    }

    /// Reads only the file's tensor names and shapes: its config, or why it is not a body
    /// model (what `load` would refuse), without building the network.
    pub fn inspect(path: &Path) -> Result<BodyPoseConfig> {
        Ok(open_checked(path)?.2)
    }
}

/// Opens a body model file and checks its tensors: the store, its naming and its config.
fn open_checked(path: &Path) -> Result<(WeightStore, Layout, BodyPoseConfig)> {
    let store = WeightStore::open(&[path.to_path_buf()])?;
    let layout = if store.shape(&module_name(SIGNATURE[0])).is_some() {
        Layout::Module
    } else {
        Layout::Original
    };
    let missing: Vec<&str> = SIGNATURE
        .iter()
        .copied()
        .filter(|name| store.shape(&layout.name(name)).is_none())
        .collect();
    if !missing.is_empty() {
        let mut names = store.tensor_names();
        names.sort();
        let sample: Vec<String> = names.iter().take(4).cloned().collect();
        let hand = names.iter().any(|n| n.starts_with("Mconv7_stage6."));
        return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "not an OpenPose body model (body_pose_model.pth): expected tensors such as {} but {} {} missing; the file has {} tensors{}{}",
                    SIGNATURE.join(", "),
                    missing.join(", "),
                    if missing.len() == 1 { "is" } else { "are" },
                    names.len(),
                    if sample.is_empty() { String::new() } else { format!(" (e.g. {})", sample.join(", ")) },
                    if hand { "; this looks like the OpenPose hand model (hand_pose_model.pth)" } else { "" },
                ),
            });
    }
    let config = BodyPoseConfig::from_store(&store, path, layout)?;
    if config.paf_channels != PAF_CHANNELS || config.heatmap_channels != HEATMAP_CHANNELS {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            message: format!(
                "an OpenPose body model has {} PAF and {} heatmap outputs, this file has {} and {}",
                PAF_CHANNELS, HEATMAP_CHANNELS, config.paf_channels, config.heatmap_channels
            ),
        });
    }
    Ok((store, layout, config))
}

impl BodyPoseModel {
    pub fn config(&self) -> &BodyPoseConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `(paf, heatmap)` = (`Mconv7_stage6_L1`, `Mconv7_stage6_L2`) for a `1 × 3 × H × W` input.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let features = run(&self.backbone, x)?;
        let mut input = features.clone();
        let mut outputs = None;
        for (i, [l1, l2]) in self.stages.iter().enumerate() {
            let paf = run(l1, &input)?;
            let heat = run(l2, &input)?;
            if i + 1 < self.stages.len() {
                input = Tensor::cat(&[&paf, &heat, &features], 1)?;
            }
            outputs = Some((paf, heat));
        }
        outputs.ok_or_else(|| ModelError::Weights("the body model has no stages".to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::module_name;

    #[test]
    fn module_names_follow_controlnet_aux_blocks() {
        assert_eq!(module_name("conv1_1.weight"), "model0.conv1_1.weight");
        assert_eq!(module_name("conv4_4_CPM.bias"), "model0.conv4_4_CPM.bias");
        assert_eq!(
            module_name("conv5_5_CPM_L1.weight"),
            "model1_1.conv5_5_CPM_L1.weight"
        );
        assert_eq!(
            module_name("conv5_1_CPM_L2.bias"),
            "model1_2.conv5_1_CPM_L2.bias"
        );
        assert_eq!(
            module_name("Mconv7_stage6_L2.weight"),
            "model6_2.Mconv7_stage6_L2.weight"
        );
        assert_eq!(
            module_name("Mconv1_stage3_L1.bias"),
            "model3_1.Mconv1_stage3_L1.bias"
        );
    }
}
