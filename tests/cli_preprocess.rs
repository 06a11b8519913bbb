//! `ipcompose preprocess` through the binary: the same maps as the library, and bad input
//! that fails with a clear message and writes nothing.

mod common;

use std::process::Command;

use common::{fixtures, scratch};
use ipcompose::preprocess::{load_image, Operation, Settings};

fn ipcompose(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ipcompose"))
        .args(args)
        .output()
        .expect("run ipcompose");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn preprocess_writes_the_annotator_map() {
    let dir = scratch("cli-preprocess");
    let photo = fixtures().join("preprocess/inputs/coffee.png");
    let out = dir.join("edges.png");
    let (ok, text) = ipcompose(&[
        "preprocess",
        "canny",
        photo.to_str().unwrap(),
        out.to_str().unwrap(),
        "--low",
        "50",
        "--high",
        "150",
        "--detect-resolution",
        "256",
        "--width",
        "300",
        "--height",
        "200",
    ]);
    assert!(ok, "{text}");
    let expected = Settings {
        operation: Operation::Canny {
            low: 50.0,
            high: 150.0,
        },
        detect_resolution: Some(256),
        output_size: Some((300, 200)),
    }
    .apply(&load_image(&photo).unwrap())
    .unwrap();
    assert_eq!(load_image(&out).unwrap(), expected);

    // An existing output is kept unless --overwrite is given.
    let (ok, text) = ipcompose(&[
        "preprocess",
        "invert",
        photo.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("already exists"), "{text}");
    let (ok, text) = ipcompose(&[
        "preprocess",
        "threshold",
        photo.to_str().unwrap(),
        out.to_str().unwrap(),
        "--level",
        "90",
        "--overwrite",
    ]);
    assert!(ok, "{text}");
}

#[test]
fn preprocess_refuses_bad_input_and_writes_nothing() {
    let dir = scratch("cli-preprocess-bad");
    let photo = fixtures().join("preprocess/inputs/coffee.png");
    let out = dir.join("out.png");
    let bogus = dir.join("bogus.png");
    std::fs::write(&bogus, b"not an image").unwrap();

    let (ok, text) = ipcompose(&[
        "preprocess",
        "canny",
        bogus.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("cannot read image"), "{text}");

    let (ok, text) = ipcompose(&[
        "preprocess",
        "blur",
        photo.to_str().unwrap(),
        out.to_str().unwrap(),
        "--low",
        "5",
    ]);
    assert!(
        !ok && text.contains("--low is an option of `canny`"),
        "{text}"
    );

    let (ok, text) = ipcompose(&[
        "preprocess",
        "blur",
        photo.to_str().unwrap(),
        out.to_str().unwrap(),
        "--factor",
        "0.5",
    ]);
    assert!(!ok && text.contains("blur factor"), "{text}");

    let (ok, text) = ipcompose(&[
        "preprocess",
        "edges",
        photo.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("canny"), "{text}");
    assert!(!out.exists());
    // Nothing but the bogus input is left in the folder (no temporary files either).
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}
