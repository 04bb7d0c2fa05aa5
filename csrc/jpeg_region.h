// Region JPEG decode with libjpeg-turbo's classic API (jpeg_region.cpp): see that file's header.
#pragma once

#include <cstddef>
#include <string>

namespace aurora {

// dlopen `path` (a libjpeg-turbo >= 1.5.1 with the libjpeg 6.2 ABI) once; false with `why` on failure.
bool jpeg_region_load(const char* path, std::string* why);
bool jpeg_region_loaded();

// Decode rows [top, bottom) and at least columns [left, right) of `data` at DCT scale 1/scale into `out`,
// an image of expect_h x expect_w pixels of `channels` (3: RGB, 4: CMYK as stored) bytes with rows
// `row_stride` bytes apart; pixel (y, x) of the scaled image lands at out + y * row_stride + x * channels.
// Columns are widened to iMCU boundaries: [*col0, *col1) are the ones written. Nothing else is written.
// Returns 0; -1 when libjpeg-turbo rejects the data, -2 when its size is not expect_h x expect_w
// (both with `why`). Runs without the GIL; re-entrant.
int jpeg_region_decode(const unsigned char* data, size_t size, unsigned char* out, ptrdiff_t row_stride,
                       int channels, int scale, int top, int bottom, int left, int right, int expect_h,
                       int expect_w, int* col0, int* col1, std::string* why);

}  // namespace aurora
