// Region JPEG decode: only the rows and columns a center crop reads, at a DCT scale, with libjpeg-turbo.
//
// What it does: libjpeg-turbo's classic API with jpeg_skip_scanlines (rows above and below the region:
// entropy decoding only, no IDCT, upsampling or colour conversion) and jpeg_crop_scanline (columns outside
// the region: entropy decoding only), at scale 1/s. The whole entropy-coded stream is still read, so a
// file corrupt or truncated anywhere is an error, as for a full decode (strict: libjpeg warnings such as
// "premature end of data" are errors, as TurboJPEG's stop-on-warning flag makes them).
//
// What it is based on: the library is the libjpeg-turbo that the Pillow wheel ships (pillow.libs), opened
// with dlopen at run time, so the build needs no system libjpeg and pip alone installs everything; the
// headers are libjpeg-turbo's own (third_party/libjpeg, IJG/BSD licences). jpeg_CreateDecompress checks
// the struct size against the library's, so a mismatching library is refused, never misused.
//
// Where it stops being fast: Huffman decoding is sequential and cannot be skipped, and it is most of a
// decode (17 of 27 ms for the 10 MP sample, this machine), so a crop of half the area saves only the
// IDCT, upsampling and colour conversion outside it: 0.8x of a full decode there, not 0.5x. Progressive
// JPEGs decode every coefficient before the first row.

#ifndef _WIN32
#include <dlfcn.h>
#endif

#include <csetjmp>
#include <cstddef>
#include <cstdio>
#include <cstring>
// clang-format off: jpeglib.h needs stdio's FILE and size_t first
#include "third_party/libjpeg/jpeglib.h"
// clang-format on

#include "jpeg_region.h"

namespace aurora {
namespace {

struct Api {
  struct jpeg_error_mgr* (*std_error)(struct jpeg_error_mgr*);
  void (*create)(j_decompress_ptr, int, size_t);
  void (*destroy)(j_decompress_ptr);
  void (*mem_src)(j_decompress_ptr, const unsigned char*, unsigned long);
  int (*read_header)(j_decompress_ptr, boolean);
  boolean (*start)(j_decompress_ptr);
  void (*crop)(j_decompress_ptr, JDIMENSION*, JDIMENSION*);
  JDIMENSION (*skip)(j_decompress_ptr, JDIMENSION);
  JDIMENSION (*read)(j_decompress_ptr, JSAMPARRAY, JDIMENSION);
  boolean (*finish)(j_decompress_ptr);
};

Api g_api;
bool g_loaded = false;

struct ErrorMgr {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void on_error(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<ErrorMgr*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

void on_message(j_common_ptr cinfo, int level) {
  if (level < 0) on_error(cinfo);  // a warning (corrupt data): strict, as TurboJPEG's STOPONWARNING
}

// The decode itself, with no C++ object alive across setjmp/longjmp. Returns 0, or -1 with `message` set.
int run(const unsigned char* data, size_t size, unsigned char* out, ptrdiff_t row_stride, int channels,
        int scale, int top, int bottom, int left, int right, int expect_h, int expect_w, int* col0, int* col1,
        char* message) {
  struct jpeg_decompress_struct cinfo;
  ErrorMgr err;
  cinfo.err = g_api.std_error(&err.pub);
  err.pub.error_exit = on_error;
  err.pub.emit_message = on_message;
  err.message[0] = '\0';
  if (setjmp(err.jump)) {
    std::snprintf(message, JMSG_LENGTH_MAX, "%s", err.message);
    g_api.destroy(&cinfo);
    return -1;
  }
  g_api.create(&cinfo, JPEG_LIB_VERSION, sizeof(cinfo));
  g_api.mem_src(&cinfo, data, static_cast<unsigned long>(size));
  g_api.read_header(&cinfo, TRUE);
  cinfo.out_color_space = channels == 4 ? JCS_CMYK : JCS_RGB;
  cinfo.scale_num = 1;
  cinfo.scale_denom = static_cast<unsigned int>(scale);
  cinfo.dct_method = JDCT_ISLOW;  // the accurate IDCT and fancy upsampling, as the full decode uses
  cinfo.do_fancy_upsampling = TRUE;
  g_api.start(&cinfo);
  if (static_cast<int>(cinfo.output_height) != expect_h || static_cast<int>(cinfo.output_width) != expect_w ||
      static_cast<int>(cinfo.output_components) != channels) {
    std::snprintf(message, JMSG_LENGTH_MAX, "libjpeg-turbo decodes %ux%ux%d at 1/%d, expected %dx%dx%d",
                  cinfo.output_width, cinfo.output_height, cinfo.output_components, scale, expect_w, expect_h,
                  channels);
    g_api.destroy(&cinfo);
    return -2;
  }
  JDIMENSION x = static_cast<JDIMENSION>(left), w = static_cast<JDIMENSION>(right - left);
  if (x != 0 || w != cinfo.output_width) g_api.crop(&cinfo, &x, &w);  // widens to iMCU boundaries
  *col0 = static_cast<int>(x);
  *col1 = static_cast<int>(x + w);
  if (top > 0) g_api.skip(&cinfo, static_cast<JDIMENSION>(top));
  unsigned char* base = out + static_cast<ptrdiff_t>(x) * channels;
  JSAMPROW rows[16];
  while (static_cast<int>(cinfo.output_scanline) < bottom) {
    const int y = static_cast<int>(cinfo.output_scanline);
    const int n = bottom - y < 16 ? bottom - y : 16;
    for (int i = 0; i < n; ++i) rows[i] = base + static_cast<ptrdiff_t>(y + i) * row_stride;
    g_api.read(&cinfo, rows, static_cast<JDIMENSION>(n));
  }
  // Skipping to the last row would end the decode without reading the rest of the stream (libjpeg-turbo
  // marks EOI reached), so a file cut below the region would pass: skip all but one row (entropy decoding
  // only), then decode that row into scratch memory, so the whole stream is read as in a full decode.
  if (cinfo.output_scanline + 1 < cinfo.output_height)
    g_api.skip(&cinfo, cinfo.output_height - cinfo.output_scanline - 1);
  if (cinfo.output_scanline < cinfo.output_height) {
    JSAMPARRAY scratch = (*cinfo.mem->alloc_sarray)(reinterpret_cast<j_common_ptr>(&cinfo), JPOOL_IMAGE,
                                                     w * static_cast<JDIMENSION>(channels), 1);
    while (cinfo.output_scanline < cinfo.output_height) g_api.read(&cinfo, scratch, 1);
  }
  g_api.finish(&cinfo);  // reads to EOI: trailing corruption is reported like a full decode's
  g_api.destroy(&cinfo);
  return 0;
}

}  // namespace

bool jpeg_region_load(const char* path, std::string* why) {
  if (g_loaded) return true;
#ifdef _WIN32
  (void)path;
  *why = "region decode is not built on Windows";
  return false;
#else
  void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    *why = dlerror();
    return false;
  }
  Api a{};
  const struct {
    void** slot;
    const char* name;
  } syms[] = {{reinterpret_cast<void**>(&a.std_error), "jpeg_std_error"},
              {reinterpret_cast<void**>(&a.create), "jpeg_CreateDecompress"},
              {reinterpret_cast<void**>(&a.destroy), "jpeg_destroy_decompress"},
              {reinterpret_cast<void**>(&a.mem_src), "jpeg_mem_src"},
              {reinterpret_cast<void**>(&a.read_header), "jpeg_read_header"},
              {reinterpret_cast<void**>(&a.start), "jpeg_start_decompress"},
              {reinterpret_cast<void**>(&a.crop), "jpeg_crop_scanline"},
              {reinterpret_cast<void**>(&a.skip), "jpeg_skip_scanlines"},
              {reinterpret_cast<void**>(&a.read), "jpeg_read_scanlines"},
              {reinterpret_cast<void**>(&a.finish), "jpeg_finish_decompress"}};
  for (const auto& s : syms) {
    *s.slot = dlsym(h, s.name);
    if (!*s.slot) {
      *why = std::string(path) + " has no " + s.name + " (not libjpeg-turbo >= 1.5.1)";
      dlclose(h);
      return false;
    }
  }
  g_api = a;  // set once, before g_loaded, under the GIL (the Python wrapper calls this once)
  g_loaded = true;
  return true;
#endif
}

bool jpeg_region_loaded() { return g_loaded; }

int jpeg_region_decode(const unsigned char* data, size_t size, unsigned char* out, ptrdiff_t row_stride,
                       int channels, int scale, int top, int bottom, int left, int right, int expect_h,
                       int expect_w, int* col0, int* col1, std::string* why) {
  char message[JMSG_LENGTH_MAX] = {0};
  const int rc = run(data, size, out, row_stride, channels, scale, top, bottom, left, right, expect_h, expect_w,
                     col0, col1, message);
  if (rc) *why = message;
  return rc;
}

}  // namespace aurora
