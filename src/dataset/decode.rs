//! Reading an image file into 8-bit RGB pixels the way the user sees the picture: EXIF
//! orientation applied, transparency flattened onto white, grayscale, 16-bit and palette images
//! converted.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

/// Decodes a file (the format is sniffed from its bytes, not its extension) and applies its
/// EXIF orientation. The error is a sentence for the user, without the file name.
pub fn decode_oriented(path: &Path) -> Result<DynamicImage, String> {
    decode_oriented_bytes(&read_image_file(path)?)
}

/// The bytes of an image file (a regular file only: see [`crate::files`]); the error is the
/// reason, to follow the file's name.
pub fn read_image_file(path: &Path) -> Result<Vec<u8>, String> {
    crate::files::read(path).map_err(|e| format!("cannot be read: {e}"))
}

/// [`decode_oriented`] on bytes already in memory.
pub fn decode_oriented_bytes(bytes: &[u8]) -> Result<DynamicImage, String> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot be read: {e}"))?;
    match reader.format() {
        None => {
            return Err(
                "is not a supported image (PNG, JPEG, WebP or BMP expected); convert it or remove it"
                    .to_string(),
            )
        }
        Some(format) if !format.reading_enabled() => {
            return Err(format!(
                "is a {format:?} image, which is not supported (PNG, JPEG, WebP or BMP expected); convert it or remove it"
            ))
        }
        Some(_) => {}
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| format!("cannot be decoded as an image: {e}"))?;
    // A broken EXIF block is not worth refusing the image for: keep it as stored.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder)
        .map_err(|e| format!("cannot be decoded as an image: {e}"))?;
    image.apply_orientation(orientation);
    if image.width() == 0 || image.height() == 0 {
        return Err("has no pixels (width or height is 0)".to_string());
    }
    Ok(image)
}

/// Converts any colour type to 8-bit RGB; transparent pixels are composited onto white.
pub fn to_rgb_on_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (width, height) = rgba.dimensions();
    let mut rgb = RgbImage::new(width, height);
    for (out, px) in rgb.pixels_mut().zip(rgba.pixels()) {
        let alpha = u32::from(px[3]);
        for c in 0..3 {
            let blended = u32::from(px[c]) * alpha + 255 * (255 - alpha);
            out[c] = ((blended + 127) / 255) as u8;
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageFormat, Luma, Rgba, RgbaImage};

    fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn alpha_is_flattened_onto_white() {
        let mut rgba = RgbaImage::new(3, 1);
        rgba.put_pixel(0, 0, Rgba([0, 0, 0, 0])); // fully transparent black -> white
        rgba.put_pixel(1, 0, Rgba([255, 0, 0, 255])); // opaque red stays red
        rgba.put_pixel(2, 0, Rgba([0, 0, 0, 128])); // half black -> mid grey
        let bytes = encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
        let rgb = to_rgb_on_white(decode_oriented_bytes(&bytes).unwrap());
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 0, 0]);
        assert_eq!(rgb.get_pixel(2, 0).0, [127, 127, 127]);
    }

    #[test]
    fn grayscale_and_16_bit_become_rgb8() {
        let gray = GrayImage::from_pixel(2, 2, Luma([200]));
        let bytes = encode(&DynamicImage::ImageLuma8(gray), ImageFormat::Png);
        let rgb = to_rgb_on_white(decode_oriented_bytes(&bytes).unwrap());
        assert_eq!(rgb.get_pixel(1, 1).0, [200, 200, 200]);

        let deep = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
            2,
            2,
            image::Rgb([65535u16, 0, 32896]),
        );
        let bytes = encode(&DynamicImage::ImageRgb16(deep), ImageFormat::Png);
        let image = decode_oriented_bytes(&bytes).unwrap();
        assert_eq!(image.color(), image::ColorType::Rgb16);
        assert_eq!(to_rgb_on_white(image).get_pixel(0, 0).0, [255, 0, 128]);
    }

    #[test]
    fn format_is_sniffed_and_garbage_refused() {
        let gray = GrayImage::from_pixel(2, 2, Luma([10]));
        let bmp = encode(&DynamicImage::ImageLuma8(gray), ImageFormat::Bmp);
        assert!(decode_oriented_bytes(&bmp).is_ok());
        let err = decode_oriented_bytes(b"definitely not an image").unwrap_err();
        assert!(err.contains("not a supported image"), "{err}");
        let err = decode_oriented_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap_err();
        assert!(
            err.contains("is a Gif image, which is not supported"),
            "{err}"
        );
        let mut truncated = encode(
            &DynamicImage::ImageLuma8(GrayImage::from_pixel(64, 64, Luma([10]))),
            ImageFormat::Png,
        );
        truncated.truncate(truncated.len() / 2);
        let err = decode_oriented_bytes(&truncated).unwrap_err();
        assert!(err.contains("cannot be decoded"), "{err}");
    }
}
