//! From decoded pixels to the training tensor: resize to cover the bucket (aspect kept, Lanczos3),
//! crop to the bucket, optionally mirror, and scale to [-1, 1] in CHW layout.

use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use image::RgbImage;

/// The resampling filter of the cover resize: Lanczos with a 3-lobe window, widened when
/// shrinking so that downscaling is anti-aliased.
pub const RESIZE_FILTER: FilterType = FilterType::Lanczos3;

/// The size an image of `source` pixels is resized to so that it covers `target` with its aspect
/// ratio kept: one side equals the target's, the other is at least as long.
pub fn cover_size(source: (u32, u32), target: (u32, u32)) -> (u32, u32) {
    let (sw, sh) = (f64::from(source.0.max(1)), f64::from(source.1.max(1)));
    let scale = (f64::from(target.0) / sw).max(f64::from(target.1) / sh);
    let width = ((sw * scale).round() as u32).max(target.0);
    let height = ((sh * scale).round() as u32).max(target.1);
    (width, height)
}

/// The largest crop offset (x, y) that keeps a `target` window inside `resized`.
pub fn max_crop(resized: (u32, u32), target: (u32, u32)) -> (u32, u32) {
    (
        resized.0.saturating_sub(target.0),
        resized.1.saturating_sub(target.1),
    )
}

/// The offset of the centred `target` window inside `resized`.
pub fn centre_crop(resized: (u32, u32), target: (u32, u32)) -> (u32, u32) {
    let (x, y) = max_crop(resized, target);
    (x / 2, y / 2)
}

/// Resizes `image` to `resized` (see [`cover_size`]), cuts the `target` window at offset `crop`
/// and mirrors it left-right when `flip` is set. Offsets beyond [`max_crop`] are clamped.
pub fn render(
    image: &RgbImage,
    resized: (u32, u32),
    target: (u32, u32),
    crop: (u32, u32),
    flip: bool,
) -> RgbImage {
    let scaled;
    let source = if image.dimensions() == resized {
        image
    } else {
        scaled = imageops::resize(image, resized.0, resized.1, RESIZE_FILTER);
        &scaled
    };
    let limit = max_crop(resized, target);
    let (x, y) = (crop.0.min(limit.0), crop.1.min(limit.1));
    let mut window = imageops::crop_imm(source, x, y, target.0, target.1).to_image();
    if flip {
        imageops::flip_horizontal_in_place(&mut window);
    }
    window
}

/// The pixels as an f32 tensor of shape `[3, height, width]` (channels R, G, B) with values
/// `x / 127.5 − 1` in [-1, 1], on the CPU.
pub fn to_tensor(image: &RgbImage) -> candle_core::Result<Tensor> {
    let (width, height) = image.dimensions();
    let plane = width as usize * height as usize;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in image.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = f32::from(px[c]) / 127.5 - 1.0;
        }
    }
    Tensor::from_vec(data, (3, height as usize, width as usize), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn cover_size_keeps_aspect_and_covers() {
        assert_eq!(cover_size((1000, 500), (512, 512)), (1024, 512));
        assert_eq!(cover_size((500, 1000), (512, 512)), (512, 1024));
        assert_eq!(cover_size((300, 200), (640, 384)), (640, 427)); // 426.67 rounds up
        assert_eq!(cover_size((100, 100), (128, 64)), (128, 128)); // upscale
        assert_eq!(cover_size((64, 64), (64, 64)), (64, 64));
        let (w, h) = cover_size((1920, 1080), (640, 384));
        assert!(w >= 640 && h >= 384 && (w == 640 || h == 384), "{w}x{h}");
    }

    #[test]
    fn crop_offsets() {
        assert_eq!(max_crop((1024, 512), (512, 512)), (512, 0));
        assert_eq!(centre_crop((1024, 512), (512, 512)), (256, 0));
        assert_eq!(centre_crop((512, 515), (512, 512)), (0, 1));
    }

    /// A wide image whose left half is red and right half is blue, with a green middle third.
    fn wide_test_image() -> RgbImage {
        RgbImage::from_fn(300, 100, |x, _| {
            if (100..200).contains(&x) {
                Rgb([0, 255, 0])
            } else if x < 100 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
    }

    #[test]
    fn centre_crop_of_a_wide_image_keeps_the_middle() {
        let image = wide_test_image();
        let resized = cover_size(image.dimensions(), (64, 64));
        assert_eq!(resized, (192, 64));
        let out = render(
            &image,
            resized,
            (64, 64),
            centre_crop(resized, (64, 64)),
            false,
        );
        assert_eq!(out.dimensions(), (64, 64));
        // The centre window is the green third (its edges blur a little into red and blue).
        for (x, _, px) in out.enumerate_pixels() {
            if (6..58).contains(&x) {
                assert!(px[1] > 200 && px[0] < 60 && px[2] < 60, "x={x}: {px:?}");
            }
        }
        // The left window is red.
        let left = render(&image, resized, (64, 64), (0, 0), false);
        assert!(left.get_pixel(10, 10)[0] > 200);
    }

    #[test]
    fn flip_mirrors_left_right() {
        let image = RgbImage::from_fn(4, 2, |x, y| Rgb([x as u8 * 10, y as u8, 7]));
        let plain = render(&image, (4, 2), (4, 2), (0, 0), false);
        let flipped = render(&image, (4, 2), (4, 2), (0, 0), true);
        assert_eq!(plain, image);
        for y in 0..2 {
            for x in 0..4 {
                assert_eq!(flipped.get_pixel(x, y), image.get_pixel(3 - x, y));
            }
        }
    }

    #[test]
    fn tensor_layout_and_range() {
        let image = RgbImage::from_fn(3, 2, |x, y| match (x, y) {
            (0, 0) => Rgb([0, 255, 51]),
            (2, 1) => Rgb([255, 0, 102]),
            _ => Rgb([128, 128, 128]),
        });
        let t = to_tensor(&image).unwrap();
        assert_eq!(t.dims(), [3, 2, 3]);
        let v: Vec<Vec<Vec<f32>>> = t.to_vec3().unwrap();
        assert_eq!(v[0][0][0], -1.0);
        assert_eq!(v[1][0][0], 1.0);
        assert!((v[2][0][0] - (51.0 / 127.5 - 1.0)).abs() < 1e-6);
        assert_eq!(v[0][1][2], 1.0);
        assert_eq!(v[1][1][2], -1.0);
        let min = t
            .flatten_all()
            .unwrap()
            .min(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let max = t
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((-1.0..=1.0).contains(&min) && (-1.0..=1.0).contains(&max));
    }
}
