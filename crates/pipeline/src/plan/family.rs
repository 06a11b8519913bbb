//! Base-model families: everything that differs between SD1.x / SD2.x and SDXL, in one place.
//!
//! The planner (`plan/`), the loader and the one denoising loop (`run/base_model.rs`, `run/denoise.rs`, with the
//! prompt encoding in `run/text.rs`) ask a base's [`Family`] what to do; nothing else branches on
//! the kind of base model. A new family is one more constant here, with a new variant of
//! [`TextEncoding`] or [`AddedConditioning`] where it needs one.

use candle_core::DType;
use ipcompose_models::folder::DiffusersFolder;
use ipcompose_models::vae::VaeConfig;
use ipcompose_schedulers::SchedulerKind;

/// The `kind:` of a base model in `models:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseKind {
    Sd15,
    Sd2,
    Sdxl,
}

/// How a family turns prompts into the UNet's text conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoding {
    /// One CLIP encoder (`text_encoder/`, `tokenizer/`): the context is the final-layer-normed
    /// `hidden_states[-(clip_skip + 1)]`; an absent negative prompt is encoded as "".
    Single,
    /// Two encoders (`text_encoder/` + `tokenizer/`, `text_encoder_2/` with its projection +
    /// `tokenizer_2/`): the context is both encoders' `hidden_states[-(clip_skip + 2)]`, without
    /// the final layer norm, concatenated on the channel axis (the negative prompt ignores clip
    /// skip, as diffusers); the pooled `text_embeds` of encoder 2 feed the added conditioning;
    /// `prompt_2` / `negative_prompt_2` go to encoder 2 (default: the first prompts); an absent
    /// negative prompt gives zero embeddings when `model_index.json` says
    /// `force_zeros_for_empty_prompt` (diffusers' default for SDXL).
    Dual,
}

/// Which conditioning the family's UNet takes besides the text context and the timestep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddedConditioning {
    None,
    /// SDXL's `addition_embed_type: text_time`: the pooled text embeddings and six
    /// micro-conditioning time ids ([`MicroConditioning`]).
    TextTime,
}

/// What a base family is made of.
#[derive(Debug)]
pub struct Family {
    /// The recipe's `kind:`.
    pub name: &'static str,
    pub text: TextEncoding,
    pub added: AddedConditioning,
    /// The scheduler of a generate node that names none (its settings always come from the
    /// folder's `scheduler_config.json`).
    pub default_scheduler: SchedulerKind,
    /// Whether the VAE decodes in f32 whatever the models' dtype when its config says
    /// `force_upcast` (diffusers' SDXL pipelines do; the SD1.x / SD2.x ones do not).
    pub vae_upcast: bool,
    /// Whether the base's weights may come from one single-file checkpoint: then the hub repo
    /// whose configs, tokenizers and scheduler it uses by default (diffusers'
    /// `from_single_file` default; a recipe's `config:` replaces it).
    pub single_file: Option<&'static str>,
    /// Whether IP-Adapters are supported on it (parity tests for this family).
    pub ip_adapters: bool,
    /// Whether ControlNets and T2I-Adapters are supported on it (each has parity tests for
    /// this family).
    pub adapters: bool,
    /// Whether LoRAs are supported on it (parity tests for this family).
    pub loras: bool,
    /// Whether textual-inversion embeddings are supported on it (parity tests for this family).
    pub embeddings: bool,
}

pub const SD15: Family = Family {
    name: "sd15",
    text: TextEncoding::Single,
    added: AddedConditioning::None,
    default_scheduler: SchedulerKind::Ddim,
    vae_upcast: false,
    single_file: Some("stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ip_adapters: true,
    adapters: true,
    loras: true,
    embeddings: true,
};

pub const SD2: Family = Family {
    name: "sd2",
    single_file: None,
    ..SD15
};

pub const SDXL: Family = Family {
    name: "sdxl",
    text: TextEncoding::Dual,
    added: AddedConditioning::TextTime,
    // The SDXL repos' `EulerDiscreteScheduler`.
    default_scheduler: SchedulerKind::Euler,
    vae_upcast: true,
    single_file: Some("stabilityai/stable-diffusion-xl-base-1.0"),
    ip_adapters: true,
    adapters: true,
    loras: true,
    embeddings: true,
};

impl Family {
    /// The dtype the VAE runs in for models in `dtype`.
    pub fn vae_dtype(&self, vae: &VaeConfig, dtype: DType) -> DType {
        if self.vae_upcast && vae.force_upcast {
            DType::F32
        } else {
            dtype
        }
    }
}

impl BaseKind {
    /// The kinds a recipe may name, for error messages.
    pub const NAMES: &'static str = "sd15, sd2, sdxl";

    pub fn parse(kind: &str) -> Option<Self> {
        match kind.to_ascii_lowercase().as_str() {
            "sd15" | "sd1.5" | "sd1" | "sd-1.5" => Some(Self::Sd15),
            "sd2" | "sd21" | "sd2.1" | "sd20" | "sd2.0" => Some(Self::Sd2),
            "sdxl" | "sd-xl" | "sdxl-base" | "sdxl1.0" => Some(Self::Sdxl),
            _ => None,
        }
    }

    pub fn family(self) -> &'static Family {
        match self {
            Self::Sd15 => &SD15,
            Self::Sd2 => &SD2,
            Self::Sdxl => &SDXL,
        }
    }

    /// The family a diffusers folder holds, for library use without a recipe: SDXL when
    /// `model_index.json` names `StableDiffusionXLPipeline` or the folder has `text_encoder_2/`,
    /// else SD1.x / SD2.x (which behave alike).
    pub fn detect(folder: &DiffusersFolder) -> ipcompose_models::Result<Self> {
        let index = folder.model_index()?;
        let sdxl_class = index
            .class_name
            .as_deref()
            .is_some_and(|c| c.starts_with("StableDiffusionXL"));
        Ok(if sdxl_class || folder.has_component("text_encoder_2") {
            Self::Sdxl
        } else {
            Self::Sd15
        })
    }
}

/// SDXL's micro-conditioning, in the recipe's orders: sizes `[width, height]`, the crop
/// `[top, left]` (diffusers' order for the crop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroConditioning {
    pub original_size: [usize; 2],
    pub crops_coords_top_left: [usize; 2],
    pub target_size: [usize; 2],
}

impl MicroConditioning {
    /// The defaults for an output of `width` × `height`: both sizes the output's, no crop.
    pub fn defaults(width: usize, height: usize) -> Self {
        Self {
            original_size: [width, height],
            crops_coords_top_left: [0, 0],
            target_size: [width, height],
        }
    }

    /// diffusers' `add_time_ids`: `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`.
    pub fn time_ids(&self) -> [f32; 6] {
        let [ow, oh] = self.original_size;
        let [top, left] = self.crops_coords_top_left;
        let [tw, th] = self.target_size;
        [oh, ow, top, left, th, tw].map(|v| v as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_to_their_families() {
        assert_eq!(BaseKind::parse("SDXL"), Some(BaseKind::Sdxl));
        assert_eq!(
            BaseKind::parse("sd1.5").map(|k| k.family().name),
            Some("sd15")
        );
        assert_eq!(BaseKind::parse("flux"), None);
        for name in BaseKind::NAMES.split(", ") {
            let kind = BaseKind::parse(name).unwrap();
            assert_eq!(kind.family().name, name);
        }
        assert_eq!(SDXL.text, TextEncoding::Dual);
        assert_eq!(SD2.text, TextEncoding::Single);
        assert!(SD15.single_file.is_some() && SD2.single_file.is_none());
        assert_eq!(
            SDXL.single_file,
            Some("stabilityai/stable-diffusion-xl-base-1.0")
        );
    }

    #[test]
    fn time_ids_are_heights_first_with_the_crop_as_given() {
        let micro = MicroConditioning {
            original_size: [128, 96],
            crops_coords_top_left: [16, 8],
            target_size: [80, 48],
        };
        // reference/sdxl_cases.json, case sdxl_micro.
        assert_eq!(micro.time_ids(), [96.0, 128.0, 16.0, 8.0, 48.0, 80.0]);
        assert_eq!(
            MicroConditioning::defaults(80, 48).time_ids(),
            [48.0, 80.0, 0.0, 0.0, 48.0, 80.0]
        );
    }

    #[test]
    fn folders_are_detected_from_model_index_and_sub_folders() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let open = |name: &str| DiffusersFolder::open(&fixtures.join(name)).unwrap();
        assert_eq!(
            BaseKind::detect(&open("tiny-sdxl")).unwrap(),
            BaseKind::Sdxl
        );
        assert_eq!(
            BaseKind::detect(&open("tiny-sd15")).unwrap(),
            BaseKind::Sd15
        );
        let index = open("tiny-sdxl").model_index().unwrap();
        assert_eq!(index.force_zeros_for_empty_prompt, Some(true));
    }
}
