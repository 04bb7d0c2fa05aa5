// Fused CPU preprocessing kernel: interface shared by preprocess.cpp and bindings.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace aurora {

enum class OutType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct Spec {
  int64_t resize = 256;  // shorter side after resizing
  int64_t crop = 224;    // side of the square center crop
  float mean[3] = {0.485f, 0.456f, 0.406f};
  float std[3] = {0.229f, 0.224f, 0.225f};
  OutType type = OutType::F32;
};

// One decoded image: uint8 RGB, rows `row_stride` bytes apart (pixels contiguous). It stands for the
// continuous extent (orig_h / scale, orig_w / scale) of an original orig_h x orig_w picture; a plain
// full-size image has scale 1 and orig == (h, w).
struct ImageView {
  const uint8_t* data = nullptr;
  int64_t h = 0, w = 0, row_stride = 0;
  int64_t orig_h = 0, orig_w = 0;
  int64_t scale = 1;
};

// torchvision's Resize(int) + CenterCrop geometry, computed from the original size.
struct Geometry {
  int64_t new_h, new_w;  // resized size (shorter side == resize, longer truncated like torchvision)
  int64_t top, left;     // crop origin in the resized image: int(round((new - crop) / 2.0)), ties to even
  double ext_h, ext_w;   // source extent in pixels of the given image: orig / scale
};

Geometry compute_geometry(int64_t orig_h, int64_t orig_w, int64_t scale, int64_t resize, int64_t crop);

// Writes one image into out: [3, crop, crop] of spec.type (float32, or the 16-bit patterns of
// float16 / bfloat16), C-contiguous. Arguments must already be validated (bindings.cpp does that).
void preprocess_image(const ImageView& im, const Spec& spec, void* out);

// Writes image i into out + i * out_stride_bytes, spreading images over num_threads threads
// (the caller is one of them). The GIL must be released by the caller.
void preprocess_batch(const std::vector<ImageView>& ims, const Spec& spec, void* out,
                      int64_t out_stride_bytes, int num_threads);

size_t coeff_cache_size();
void clear_coeff_cache();

}  // namespace aurora
