// The pybind11 module aurora_core._C: argument checks, then calls into the kernels.
//
// Every entry point takes objects exporting the buffer protocol (numpy arrays; torch CPU tensors reach
// it through zero-copy .numpy() views in aurora_core.ops.preprocess) and rejects anything the kernel
// cannot read safely with a ValueError or TypeError naming the op, the expectation and the fact.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "jpeg_region.h"
#include "preprocess.h"

namespace py = pybind11;

namespace {

// A held Py_buffer, released with the object (movable, not copyable).
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : view_(o.view_), held_(o.held_) { o.held_ = false; }
  ~Buffer() {
    if (held_) PyBuffer_Release(&view_);
  }
  bool acquire(PyObject* obj) {
    if (PyObject_GetBuffer(obj, &view_, PyBUF_RECORDS_RO) != 0) {
      PyErr_Clear();
      return false;
    }
    held_ = true;
    return true;
  }
  const Py_buffer& v() const { return view_; }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

std::string describe(const Py_buffer& b) {
  std::string s = "format '" + std::string(b.format ? b.format : "B") + "' itemsize " +
                  std::to_string(b.itemsize) + " shape [";
  for (int i = 0; i < b.ndim; ++i) s += (i ? ", " : "") + std::to_string(b.shape[i]);
  return s + "]";
}

// Native-endian format code of a buffer ('<', '=', '@' prefixes dropped), e.g. "B", "f", "e", "h".
std::string format_code(const Py_buffer& b) {
  std::string f = b.format ? b.format : "B";
  while (!f.empty() && (f[0] == '@' || f[0] == '=' || f[0] == '<')) f.erase(0, 1);
  return f;
}

void check_strides(const char* op, const char* what, const Py_buffer& b) {
  Py_ssize_t expect = b.itemsize;
  for (int i = b.ndim - 1; i >= 0; --i) {
    const Py_ssize_t st = b.strides ? b.strides[i] : expect;
    if (st < 0)
      throw py::value_error(std::string(op) + ": " + what + " has negative strides (a flipped view). " +
                            "Pass np.ascontiguousarray(" + what + ").");
    if (b.shape[i] > 1 && st != expect)
      throw py::value_error(std::string(op) + ": expected a C-contiguous " + what + ", got " +
                            describe(b) + " with non-contiguous strides. Pass np.ascontiguousarray(" +
                            what + ").");
    expect *= b.shape[i];
  }
}

void get_buffer(const char* op, const char* what, py::handle obj, const char* expected, Buffer& buf) {
  if (obj.is_none() || !buf.acquire(obj.ptr()))
    throw py::type_error(std::string(op) + ": expected " + what + " as " + expected + ", got " +
                         type_name(obj) + " (no buffer protocol). Convert it with np.asarray() or pass "
                         "a torch tensor through aurora_core.preprocess().");
}

// img: uint8 [H, W, 3], C-contiguous, non-empty.
aurora::ImageView parse_image(const char* op, const char* what, py::handle obj, std::vector<Buffer>& keep) {
  Buffer buf;
  get_buffer(op, what, obj, "a uint8 array [H, W, 3]", buf);
  const Py_buffer& b = buf.v();
  const std::string fmt = format_code(b);
  if (b.itemsize != 1 || fmt != "B")
    throw py::type_error(std::string(op) + ": expected " + what + " as a uint8 array [H, W, 3], got " +
                         describe(b) + ". Decode with aurora_core.decode() first.");
  if (b.ndim != 3 || b.shape[2] != 3)
    throw py::value_error(std::string(op) + ": expected " + what + " as a uint8 array [H, W, 3] (RGB), got " +
                          describe(b) + ". Decode with aurora_core.decode(), which returns RGB.");
  if (b.shape[0] == 0 || b.shape[1] == 0)
    throw py::value_error(std::string(op) + ": expected a non-empty " + what + ", got " + describe(b) + ".");
  check_strides(op, what, b);
  aurora::ImageView im;
  im.data = static_cast<const uint8_t*>(b.buf);
  im.h = b.shape[0];
  im.w = b.shape[1];
  im.row_stride = im.w * 3;
  keep.push_back(std::move(buf));
  return im;
}

aurora::OutType parse_dtype(const char* op, const std::string& dtype) {
  if (dtype == "float32") return aurora::OutType::F32;
  if (dtype == "float16") return aurora::OutType::F16;
  if (dtype == "bfloat16") return aurora::OutType::BF16;
  throw py::value_error(std::string(op) + ": expected dtype 'float32', 'float16' or 'bfloat16', got '" +
                        dtype + "'.");
}

// out: writable, C-contiguous, shape lead + [3, crop, crop], element type matching the dtype
// (float32: 'f'; float16: 'e' or a 16-bit integer view; bfloat16: a 16-bit integer view).
void* parse_out(const char* op, py::handle obj, aurora::OutType type, const std::vector<Py_ssize_t>& shape,
                Buffer& keep) {
  get_buffer(op, "out", obj, "a writable array [..., 3, crop, crop]", keep);
  const Py_buffer& b = keep.v();
  if (b.readonly)
    throw py::value_error(std::string(op) + ": out is read-only; pass a writable array or tensor.");
  const std::string fmt = format_code(b);
  bool ok;
  const char* want;
  if (type == aurora::OutType::F32) {
    ok = b.itemsize == 4 && fmt == "f";
    want = "float32";
  } else if (type == aurora::OutType::F16) {
    ok = b.itemsize == 2 && (fmt == "e" || fmt == "h" || fmt == "H");
    want = "float16 (or its int16 view)";
  } else {
    ok = b.itemsize == 2 && (fmt == "h" || fmt == "H");
    want = "an int16 view of a bfloat16 tensor";
  }
  if (!ok)
    throw py::type_error(std::string(op) + ": expected out of dtype " + want + ", got " + describe(b) + ".");
  bool shape_ok = b.ndim == static_cast<int>(shape.size());
  for (size_t i = 0; shape_ok && i < shape.size(); ++i) shape_ok = b.shape[i] == shape[i];
  if (!shape_ok) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    throw py::value_error(std::string(op) + ": expected out of shape " + s + "], got " + describe(b) + ".");
  }
  check_strides(op, "out", b);
  return b.buf;
}

aurora::Spec parse_spec(const char* op, int64_t resize, int64_t crop, const std::vector<double>& mean,
                        const std::vector<double>& std, const std::string& dtype) {
  // Upper bounds keep size * long within exact double range (no overflow in the geometry).
  if (resize <= 0 || crop <= 0 || crop > resize || resize > (1 << 16))
    throw py::value_error(std::string(op) + ": expected 0 < crop <= resize <= 65536, got resize=" +
                          std::to_string(resize) + ", crop=" + std::to_string(crop) + ".");
  if (mean.size() != 3 || std.size() != 3)
    throw py::value_error(std::string(op) + ": expected 3 means and 3 stds (RGB), got " +
                          std::to_string(mean.size()) + " and " + std::to_string(std.size()) + ".");
  aurora::Spec s;
  s.resize = resize;
  s.crop = crop;
  for (int c = 0; c < 3; ++c) {
    if (!(std[c] > 0.0) || !std::isfinite(std[c]) || !std::isfinite(mean[c]))
      throw py::value_error(std::string(op) + ": expected finite means and stds > 0, got std[" +
                            std::to_string(c) + "]=" + std::to_string(std[c]) + ".");
    s.mean[c] = static_cast<float>(mean[c]);
    s.std[c] = static_cast<float>(std[c]);
  }
  s.type = parse_dtype(op, dtype);
  return s;
}

// Original size and DCT scale of an image: the image must be ceil(orig / scale) pixels.
void set_origin(const char* op, aurora::ImageView& im, py::handle orig_size, int64_t scale) {
  if (scale < 1 || scale > 64)
    throw py::value_error(std::string(op) + ": expected scale in 1..64 (a DCT denominator), got " +
                          std::to_string(scale) + ".");
  int64_t oh = im.h, ow = im.w;
  if (!orig_size.is_none()) {
    std::pair<int64_t, int64_t> hw;
    try {
      hw = orig_size.cast<std::pair<int64_t, int64_t>>();
    } catch (const py::cast_error&) {
      throw py::type_error(std::string(op) + ": expected orig_size as a pair of ints (H0, W0), got " +
                           type_name(orig_size) + ".");
    }
    oh = hw.first;
    ow = hw.second;
  }
  const int64_t limit = int64_t(1) << 31;
  if (oh <= 0 || ow <= 0 || oh > limit || ow > limit || (oh + scale - 1) / scale != im.h ||
      (ow + scale - 1) / scale != im.w)
    throw py::value_error(std::string(op) + ": image of " + std::to_string(im.h) + "x" + std::to_string(im.w) +
                          " does not match orig_size " + std::to_string(oh) + "x" + std::to_string(ow) +
                          " at scale 1/" + std::to_string(scale) +
                          " (expected ceil(orig / scale)). Pass decode_ex()'s orig_size and scale.");
  im.orig_h = oh;
  im.orig_w = ow;
  im.scale = scale;
}

py::object preprocess(py::handle img, py::handle out, int64_t resize, int64_t crop, std::vector<double> mean,
                      std::vector<double> std, const std::string& dtype, py::handle orig_size, int64_t scale) {
  const char* op = "preprocess";
  const aurora::Spec spec = parse_spec(op, resize, crop, mean, std, dtype);
  std::vector<Buffer> keep;
  aurora::ImageView im = parse_image(op, "img", img, keep);
  set_origin(op, im, orig_size, scale);
  Buffer out_buf;
  void* dst = parse_out(op, out, spec.type, {3, crop, crop}, out_buf);
  {
    py::gil_scoped_release release;
    aurora::preprocess_image(im, spec, dst);
  }
  return py::reinterpret_borrow<py::object>(out);
}

py::object preprocess_batch(py::handle imgs, py::handle out, int64_t resize, int64_t crop,
                            std::vector<double> mean, std::vector<double> std, const std::string& dtype,
                            py::handle orig_sizes, py::handle scales, int num_threads) {
  const char* op = "preprocess_batch";
  const aurora::Spec spec = parse_spec(op, resize, crop, mean, std, dtype);
  if (!py::isinstance<py::list>(imgs) && !py::isinstance<py::tuple>(imgs))
    throw py::type_error(std::string(op) + ": expected imgs as a list of uint8 arrays [H, W, 3], got " +
                         type_name(imgs) + ".");
  const py::sequence seq = py::reinterpret_borrow<py::sequence>(imgs);
  const size_t n = seq.size();
  if (n == 0) throw py::value_error(std::string(op) + ": expected at least one image, got an empty list.");
  auto optional_seq = [&](py::handle h, const char* name) -> py::sequence {
    if (h.is_none()) return py::sequence();
    if ((!py::isinstance<py::list>(h) && !py::isinstance<py::tuple>(h)) || py::len(h) != n)
      throw py::value_error(std::string(op) + ": expected " + name + " as a list of " + std::to_string(n) +
                            " entries (one per image) or None, got " + type_name(h) + ".");
    return py::reinterpret_borrow<py::sequence>(h);
  };
  const py::sequence sizes = optional_seq(orig_sizes, "orig_sizes");
  const py::sequence scl = optional_seq(scales, "scales");
  std::vector<Buffer> keep;
  keep.reserve(n);
  std::vector<aurora::ImageView> ims;
  ims.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string what = "imgs[" + std::to_string(i) + "]";
    aurora::ImageView im = parse_image(op, what.c_str(), seq[i], keep);
    int64_t s = 1;
    if (!scales.is_none()) {
      try {
        s = scl[i].cast<int64_t>();
      } catch (const py::cast_error&) {
        throw py::type_error(std::string(op) + ": expected scales[" + std::to_string(i) + "] as an int, got " +
                             type_name(scl[i]) + ".");
      }
    }
    set_origin(op, im, orig_sizes.is_none() ? py::handle(py::none()) : py::handle(sizes[i]), s);
    ims.push_back(im);
  }
  Buffer out_buf;
  void* dst = parse_out(op, out, spec.type, {static_cast<Py_ssize_t>(n), 3, crop, crop}, out_buf);
  const int64_t item = spec.type == aurora::OutType::F32 ? 4 : 2;
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  {
    py::gil_scoped_release release;
    aurora::preprocess_batch(ims, spec, dst, 3 * crop * crop * item, num_threads);
  }
  return py::reinterpret_borrow<py::object>(out);
}

// data: the JPEG bytes; out: writable uint8 [H, W, C] (C = 3 RGB or 4 CMYK), C-contiguous, the scaled image.
py::tuple jpeg_decode_region(py::handle data, py::handle out, int scale, int top, int bottom, int left,
                             int right) {
  const char* op = "jpeg_decode_region";
  if (!aurora::jpeg_region_loaded())
    throw std::runtime_error(std::string(op) + ": no libjpeg-turbo loaded; call jpeg_region_load(path) first.");
  Buffer src, dst;
  get_buffer(op, "data", data, "bytes", src);
  if (dst.acquire(out.ptr()) == false || PyBuffer_IsContiguous(&dst.v(), 'C') == 0 || dst.v().readonly ||
      dst.v().itemsize != 1 || dst.v().ndim != 3 || (dst.v().shape[2] != 3 && dst.v().shape[2] != 4))
    throw py::value_error(std::string(op) + ": expected out as a writable C-contiguous uint8 array [H, W, 3 or 4].");
  const Py_buffer& o = dst.v();
  const int h = static_cast<int>(o.shape[0]), w = static_cast<int>(o.shape[1]), c = static_cast<int>(o.shape[2]);
  if (scale < 1 || scale > 8 || top < 0 || bottom > h || top >= bottom || left < 0 || right > w || left >= right ||
      o.shape[0] > (1 << 30) || o.shape[1] > (1 << 30))
    throw py::value_error(std::string(op) + ": expected scale in 1..8 and 0 <= top < bottom <= H, 0 <= left < "
                          "right <= W for out [" + std::to_string(h) + ", " + std::to_string(w) + "].");
  int col0 = 0, col1 = 0, rc = 0;
  std::string why;
  {
    py::gil_scoped_release release;
    rc = aurora::jpeg_region_decode(static_cast<const unsigned char*>(src.v().buf),
                                    static_cast<size_t>(src.v().len), static_cast<unsigned char*>(o.buf),
                                    static_cast<ptrdiff_t>(w) * c, c, scale, top, bottom, left, right, h, w,
                                    &col0, &col1, &why);
  }
  return py::make_tuple(rc, col0, col1, why);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "aurora_core native kernels (fused CPU preprocessing). Use aurora_core.preprocess instead.";
  m.def("preprocess", &preprocess, py::arg("img"), py::arg("out"), py::kw_only(), py::arg("resize"),
        py::arg("crop"), py::arg("mean"), py::arg("std"), py::arg("dtype") = "float32",
        py::arg("orig_size") = py::none(), py::arg("scale") = 1,
        "img: uint8 [H, W, 3] C-contiguous; out: writable [3, crop, crop] float32 / float16 / int16 view "
        "(bfloat16). Writes out in place (GIL released) and returns it.");
  m.def("preprocess_batch", &preprocess_batch, py::arg("imgs"), py::arg("out"), py::kw_only(),
        py::arg("resize"), py::arg("crop"), py::arg("mean"), py::arg("std"), py::arg("dtype") = "float32",
        py::arg("orig_sizes") = py::none(), py::arg("scales") = py::none(), py::arg("num_threads") = 0,
        "imgs: list of uint8 [H_i, W_i, 3]; out: writable [N, 3, crop, crop]. num_threads <= 0 means one "
        "per core: at most that many threads, fewer when the batch is too small to pay for starting them. "
        "Images are spread over threads with the GIL released.");
  m.def(
      "geometry",
      [](int64_t orig_h, int64_t orig_w, int64_t scale, int64_t resize, int64_t crop) {
        if (orig_h <= 0 || orig_w <= 0 || scale <= 0 || resize <= 0 || crop <= 0 || crop > resize ||
            resize > (1 << 16) || orig_h > (int64_t(1) << 31) || orig_w > (int64_t(1) << 31))
          throw py::value_error("geometry: expected positive sizes, crop <= resize <= 65536, orig < 2^31.");
        const aurora::Geometry g = aurora::compute_geometry(orig_h, orig_w, scale, resize, crop);
        return py::make_tuple(g.new_h, g.new_w, g.top, g.left);
      },
      py::arg("orig_h"), py::arg("orig_w"), py::arg("scale"), py::arg("resize"), py::arg("crop"),
      "(new_h, new_w, top, left) of torchvision's Resize(resize) + CenterCrop(crop).");
  m.def(
      "jpeg_region_load",
      [](const std::string& path) {
        std::string why;
        const bool ok = aurora::jpeg_region_load(path.c_str(), &why);
        return py::make_tuple(ok, why);
      },
      py::arg("path"), "dlopen a libjpeg-turbo (libjpeg 6.2 ABI) once: (ok, why).");
  m.def("jpeg_decode_region", &jpeg_decode_region, py::arg("data"), py::arg("out"), py::kw_only(),
        py::arg("scale"), py::arg("top"), py::arg("bottom"), py::arg("left"), py::arg("right"),
        "Decode rows [top, bottom), columns [left, right) widened to iMCU boundaries, of a JPEG at scale "
        "1/scale into out (the whole scaled image's shape). Returns (rc, col0, col1, why): rc 0 ok, -1 "
        "corrupt data, -2 size mismatch; [col0, col1) the columns written. GIL released.");
  m.def("coeff_cache_size", &aurora::coeff_cache_size);
  m.def("clear_coeff_cache", &aurora::clear_coeff_cache);
  m.def("hardware_concurrency", []() { return static_cast<int>(std::thread::hardware_concurrency()); });
}
