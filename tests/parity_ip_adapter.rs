//! IP-Adapter parity with diffusers at the model level: the CLIP image encoder, each image
//! projection, the checkpoint containers, and one UNet forward with decoupled attention.
//! Fixtures: tests/fixtures/make_adapter_fixtures.py.

mod common;

use candle_core::DType;
use common::{fixtures, get, max_abs, max_abs_diff, reference};
use ipcompose::models::clip_vision::load_image_encoder;
use ipcompose::models::ip_adapter::{inspect, IpAdapter, ProjectionKind};
use ipcompose::models::unet::{Injections, IpKeyValue};
use ipcompose::pipeline::BaseModel;

fn adapter(name: &str) -> IpAdapter {
    let path = fixtures().join("ip-adapter").join(name);
    IpAdapter::load(&path, DType::F32, &common::device()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn image_encoder_matches_transformers() {
    let r = reference("ip_encoder.safetensors");
    for folder in ["image_encoder", "image_encoder_bin"] {
        let encoder = load_image_encoder(
            &fixtures().join("ip-adapter").join(folder),
            DType::F32,
            &common::device(),
        )
        .unwrap();
        let out = encoder.forward(get(&r, "pixel_values")).unwrap();
        let d_embeds = max_abs_diff(&out.image_embeds, get(&r, "image_embeds"));
        let d_hidden = max_abs_diff(&out.penultimate, get(&r, "penultimate"));
        eprintln!("{folder}: image_embeds {d_embeds:.2e}, penultimate {d_hidden:.2e}");
        assert!(
            d_embeds < 1e-4 && d_hidden < 1e-4,
            "{folder}: {d_embeds} / {d_hidden}"
        );
        let zeros = get(&r, "pixel_values").zeros_like().unwrap();
        let uncond = encoder.forward(&zeros).unwrap();
        let d_uncond = max_abs_diff(&uncond.penultimate, get(&r, "uncond_penultimate"));
        assert!(d_uncond < 1e-4, "uncond penultimate differs by {d_uncond}");
    }
}

#[test]
fn every_projection_matches_diffusers() {
    let enc = reference("ip_encoder.safetensors");
    let r = reference("ip_proj.safetensors");
    let cases = [
        (
            "ip-adapter_tiny.safetensors",
            "plain",
            get(&enc, "image_embeds").clone(),
        ),
        (
            "ip-adapter-plus_tiny.safetensors",
            "plus",
            get(&enc, "penultimate").clone(),
        ),
        (
            "ip-adapter-full-face_tiny.safetensors",
            "faceful",
            get(&enc, "penultimate").clone(),
        ),
    ];
    for (file, key, features) in cases {
        let a = adapter(file);
        let tokens = a.image_tokens(&features).unwrap();
        let diff = max_abs_diff(&tokens, get(&r, key));
        eprintln!("{key}: tokens max abs diff {diff:.2e}");
        assert!(diff < 1e-4, "{key} tokens differ by {diff}");
    }
    // Plain negative tokens: the projection of a zero embedding.
    let plain = adapter("ip-adapter_tiny.safetensors");
    let zeros = get(&enc, "image_embeds").zeros_like().unwrap();
    let neg = plain.image_tokens(&zeros).unwrap();
    assert!(max_abs_diff(&neg, get(&r, "plain_neg")) < 1e-4);
    // Hidden-state variants: the projection of the encoder run on zero pixels.
    let plus = adapter("ip-adapter-plus_tiny.safetensors");
    let neg = plus.image_tokens(get(&enc, "uncond_penultimate")).unwrap();
    assert!(max_abs_diff(&neg, get(&r, "plus_neg")) < 1e-4);
}

#[test]
fn variants_are_detected_from_tensors() {
    let dir = fixtures().join("ip-adapter");
    let plain = inspect(&dir.join("ip-adapter_tiny.safetensors")).unwrap();
    assert_eq!(plain.projection, ProjectionKind::Plain { tokens: 4 });
    assert_eq!(plain.cross_attention_dim, 32);
    assert_eq!(plain.layer_channels.len(), 16);
    assert!(matches!(
        inspect(&dir.join("ip-adapter-plus_tiny.safetensors"))
            .unwrap()
            .projection,
        ProjectionKind::Resampler {
            tokens: 16,
            depth: 4,
            ..
        }
    ));
    assert_eq!(
        inspect(&dir.join("ip-adapter-full-face_tiny.safetensors"))
            .unwrap()
            .projection,
        ProjectionKind::FullFace
    );
    let err = inspect(&dir.join("ip-adapter-faceid_tiny.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("FaceID") && err.contains("not supported"),
        "{err}"
    );
}

#[test]
fn bin_and_training_export_equal_safetensors() {
    let enc = reference("ip_encoder.safetensors");
    let embeds = get(&enc, "image_embeds");
    let reference_tokens = adapter("ip-adapter_tiny.safetensors")
        .image_tokens(embeds)
        .unwrap();
    for file in ["ip-adapter_tiny.bin", "ip-adapter_tiny_training_export.bin"] {
        let a = adapter(file);
        assert_eq!(
            max_abs_diff(&a.image_tokens(embeds).unwrap(), &reference_tokens),
            0.0,
            "{file}"
        );
        let kv = a.layer_key_values(&reference_tokens).unwrap();
        let kv_ref = adapter("ip-adapter_tiny.safetensors")
            .layer_key_values(&reference_tokens)
            .unwrap();
        for ((k, v), (k2, v2)) in kv.iter().zip(&kv_ref) {
            assert_eq!(max_abs_diff(k, k2), 0.0);
            assert_eq!(max_abs_diff(v, v2), 0.0);
        }
    }
}

#[test]
fn unet_forward_with_decoupled_attention_matches_diffusers() {
    let model =
        BaseModel::from_folder(&fixtures().join("tiny-sd15"), &common::device(), DType::F32)
            .unwrap();
    let r = reference("ip_unet_step.safetensors");
    let scale = get(&r, "scale")
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let t = get(&r, "timestep")
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let a = adapter("ip-adapter_tiny.safetensors");
    let embeds = get(&r, "image_embeds").squeeze(1).unwrap();
    let tokens = a.image_tokens(&embeds).unwrap();
    assert!(max_abs_diff(&tokens, get(&r, "ip_tokens")) < 1e-4);
    let layers: Vec<Vec<IpKeyValue>> = a
        .layer_key_values(&tokens)
        .unwrap()
        .into_iter()
        .map(|(key, value)| {
            vec![IpKeyValue {
                key,
                value,
                scale,
                mask: None,
            }]
        })
        .collect();
    let injections = Injections {
        ip_layers: &layers,
        ..Default::default()
    };
    let (sample, context) = (get(&r, "sample"), get(&r, "context"));
    let out = model.unet.forward(sample, t, context, &injections).unwrap();
    let diff = max_abs_diff(&out, get(&r, "out"));
    eprintln!("UNet with IP-Adapter: max abs diff {diff:.2e}");
    assert!(diff < 1e-4, "UNet+IP output differs by {diff}");
    let plain = model
        .unet
        .forward(sample, t, context, &Injections::default())
        .unwrap();
    assert!(max_abs_diff(&plain, get(&r, "out_plain")) < 1e-4);
    let effect = max_abs_diff(&out, &plain);
    assert!(
        effect > 10.0 * diff && effect > 1e-3 * max_abs(&plain),
        "adapter has no visible effect: {effect}"
    );
}
