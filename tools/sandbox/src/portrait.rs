//! The sandbox's "AI" portraits: the customer's photo, cropped to a portrait, with a filter
//! that tells the prompts apart (warm, cool, black and white), a frame, and the prompt's words
//! written across the bottom, so the person sees their own photos come back.

use image::{imageops, DynamicImage, ImageFormat, Rgb, RgbImage};

const WIDTH: u32 = 480;
const HEIGHT: u32 = 600;
/// Each glyph of the 8x8 font is drawn this many pixels wide.
const SCALE: u32 = 2;

/// A JPEG portrait from `photo` for prompt `n` (1-based) with `text` as its caption. A photo
/// that cannot be decoded becomes a plain gradient, still captioned.
pub fn render(photo: &[u8], n: usize, text: &str) -> Vec<u8> {
    let base = match image::load_from_memory(photo) {
        Ok(img) => img.resize_to_fill(WIDTH, HEIGHT, imageops::FilterType::Triangle).to_rgb8(),
        Err(_) => {
            RgbImage::from_fn(WIDTH, HEIGHT, |x, y| Rgb([(x * 255 / WIDTH) as u8, (y * 255 / HEIGHT) as u8, 160]))
        }
    };
    let mut img = filter(base, n);
    frame(&mut img, accent(n));
    caption(&mut img, text);
    let mut out = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img).write_to(&mut out, ImageFormat::Jpeg).expect("JPEG encoding of an RGB image");
    out.into_inner()
}

fn accent(n: usize) -> Rgb<u8> {
    [Rgb([214, 160, 60]), Rgb([70, 140, 220]), Rgb([230, 230, 230])][(n + 2) % 3]
}

fn filter(mut img: RgbImage, n: usize) -> RgbImage {
    for p in img.pixels_mut() {
        let [r, g, b] = p.0.map(f32::from);
        let luma = 0.299 * r + 0.587 * g + 0.114 * b;
        let out = match n % 3 {
            // warm: sepia
            1 => [luma * 1.07 + 20.0, luma * 0.95 + 10.0, luma * 0.75],
            // cool: blue, raised contrast
            2 => [r * 0.8, g * 0.95, b * 1.1 + 25.0].map(|c| (c - 128.0) * 1.15 + 128.0),
            // black and white, high contrast
            _ => [(luma - 128.0) * 1.4 + 128.0; 3],
        };
        p.0 = out.map(|c| c.clamp(0.0, 255.0) as u8);
    }
    img
}

fn frame(img: &mut RgbImage, color: Rgb<u8>) {
    let (w, h) = img.dimensions();
    for (x, y, p) in img.enumerate_pixels_mut() {
        if x < 10 || y < 10 || x >= w - 10 || y >= h - 10 {
            *p = color;
        }
    }
}

/// The text on a dark band at the bottom, wrapped to the width, in the 8x8 bitmap font.
fn caption(img: &mut RgbImage, text: &str) {
    let (w, h) = img.dimensions();
    let glyph = 8 * SCALE;
    let per_line = ((w - 40) / glyph) as usize;
    let mut lines: Vec<String> = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("one line");
        if !line.is_empty() && line.len() + 1 + word.len() > per_line {
            lines.push(word.chars().take(per_line).collect());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    let band = lines.len() as u32 * (glyph + 6) + 20;
    let top = h - 10 - band;
    for y in top..h - 10 {
        for x in 10..w - 10 {
            let p = img.get_pixel_mut(x, y);
            p.0 = p.0.map(|c| c / 4);
        }
    }
    for (row, line) in lines.iter().enumerate() {
        let y0 = top + 10 + row as u32 * (glyph + 6);
        for (col, ch) in line.chars().enumerate() {
            let bitmap = font8x8::legacy::BASIC_LEGACY.get(ch as usize).copied().unwrap_or([0; 8]);
            let x0 = 20 + col as u32 * glyph;
            for (gy, bits) in bitmap.iter().enumerate() {
                for gx in 0..8u32 {
                    if bits & (1 << gx) != 0 {
                        for dy in 0..SCALE {
                            for dx in 0..SCALE {
                                img.put_pixel(x0 + gx * SCALE + dx, y0 + gy as u32 * SCALE + dy, Rgb([255, 255, 255]));
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_portrait_is_a_jpeg_of_the_photo_with_a_caption() {
        let mut photo = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(64, 64, image::Rgb([200, 30, 30])))
            .write_to(&mut photo, image::ImageFormat::Png)
            .unwrap();
        let out = super::render(photo.get_ref(), 1, "studio headshot, soft light");
        let img = image::load_from_memory(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (super::WIDTH, super::HEIGHT));
        // The middle of the photo went through the sepia filter: red, not the pure red it was.
        let mid = img.get_pixel(240, 200).0;
        assert!(mid[0] > mid[2] && mid[1] > 40, "sepia, got {mid:?}");
        // The caption band holds white glyph pixels.
        let white = (300..590)
            .flat_map(|x| (500..590).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x % 480, y).0.iter().all(|c| *c > 200))
            .count();
        assert!(white > 50, "caption drawn, {white} white pixels");
    }
}
