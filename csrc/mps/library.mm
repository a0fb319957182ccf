// metalq's Metal library (the metallib beside the extension, else embedded sources compiled one
// kernel at a time at first use), the pipeline cache, and the DispatchPlan encoder (pattern:
// PyTorch's MPS-extension example, DESIGN.md).
#include "library.h"

#include <ATen/mps/MPSDevice.h>
#include <ATen/mps/MPSStream.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <unordered_map>

// Generated at build time by tools/metal_library.py (setup.py).
#include "metalq_metal_library.h"

#if !__has_feature(objc_arc)
#error "csrc/mps is written for ARC: compile with -fobjc-arc"
#endif

namespace metalq::mps {
namespace {

std::string error_text(NSError* error) {
  return error ? std::string([[error localizedDescription] UTF8String]) : std::string("no error details");
}

id<MTLDevice> device() {
  return at::mps::MPSDevice::getInstance()->device();
}

// Metal 3.1 needs macOS 14: say so rather than fail inside Metal with a less clear message.
void check_macos_version() {
  NSProcessInfo* info = [NSProcessInfo processInfo];
  NSOperatingSystemVersion minimum = {metal_library::kMacosMinMajor, metal_library::kMacosMinMinor, 0};
  if ([info isOperatingSystemAtLeastVersion:minimum]) return;
  NSOperatingSystemVersion v = [info operatingSystemVersion];
  TORCH_CHECK(false, "metalq: the MPS kernels need macOS ", metal_library::kMacosMinMajor, ".",
              metal_library::kMacosMinMinor, " or newer (Metal 3.1); this is macOS ", v.majorVersion, ".",
              v.minorVersion, ". metalq's CPU ops work on this macOS: keep the model on the CPU.");
}

// The folder of the loaded extension (the metallib is installed beside it).
std::string extension_dir() {
  Dl_info info{};
  TORCH_CHECK(dladdr(reinterpret_cast<const void*>(&check_macos_version), &info) && info.dli_fname,
              "metalq: cannot locate the metalq._C library file");
  std::string path(info.dli_fname);
  return path.substr(0, path.find_last_of('/') + 1);
}

id<MTLLibrary> load_metallib(const std::string& kernel) {
  const std::string path = extension_dir() + metal_library::kMetallibName;
  NSURL* url = [NSURL fileURLWithPath:[NSString stringWithUTF8String:path.c_str()]];
  NSError* error = nil;
  id<MTLLibrary> library = [device() newLibraryWithURL:url error:&error];
  TORCH_CHECK(library, "metalq: cannot load the Metal library ", path, " for kernel ", kernel, ": ", error_text(error),
              ". Reinstall metalq (pip install --no-build-isolation --force-reinstall --no-deps .).");
  return library;
}

// Metal 3.1 without fast math: the roundings of the metallib built with -fno-fast-math.
MTLCompileOptions* compile_options() {
  MTLCompileOptions* options = [MTLCompileOptions new];
  options.languageVersion = MTLLanguageVersion3_1;
  if (@available(macOS 15.0, *)) {
    options.mathMode = MTLMathModeSafe;
    options.mathFloatingPointFunctions = MTLMathFloatingPointFunctionsPrecise;
  } else {
    options.fastMathEnabled = NO;
  }
  return options;
}

// The embedded-sources library: one library per kernel, its prelude plus its instantiation line.
id<MTLLibrary> compile_kernel(const std::string& kernel) {
  const metal_library::Kernel* begin = metal_library::kKernels;
  const metal_library::Kernel* end = begin + metal_library::kKernelCount;
  const auto* entry = std::lower_bound(begin, end, kernel, [](const metal_library::Kernel& k, const std::string& n) {
    return std::strcmp(k.name, n.c_str()) < 0;
  });
  TORCH_CHECK(entry != end && kernel == entry->name, "metalq: kernel ", kernel,
              " is not in the Metal library (see metal/quantized.metal)");
  std::string source = std::string(metal_library::kPreludes[entry->prelude]) + "\n" + entry->instantiation + "\n";
  NSString* text = [NSString stringWithUTF8String:source.c_str()];
  NSError* error = nil;
  id<MTLLibrary> library = [device() newLibraryWithSource:text options:compile_options() error:&error];
  TORCH_CHECK(library, "metalq: Metal cannot compile kernel ", kernel, ": ", error_text(error));
  return library;
}

id<MTLFunction> function(const std::string& kernel) {
  id<MTLLibrary> library = nil;
  if (metal_library::kIsMetallib) {
    // Loaded once per process on first use; a failure throws and is retried by the next call.
    static id<MTLLibrary> metallib = load_metallib(kernel);
    library = metallib;
  } else {
    library = compile_kernel(kernel);
  }
  id<MTLFunction> f = [library newFunctionWithName:[NSString stringWithUTF8String:kernel.c_str()]];
  TORCH_CHECK(f, "metalq: kernel ", kernel, " is not in the Metal library (see metal/quantized.metal)");
  return f;
}

}  // namespace

id<MTLComputePipelineState> pipeline(const std::string& kernel) {
  static std::mutex mutex;
  static std::unordered_map<std::string, id<MTLComputePipelineState>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = cache.find(kernel); it != cache.end()) return it->second;
  @autoreleasepool {
    static const bool macos_checked = (check_macos_version(), true);
    (void)macos_checked;
    NSError* error = nil;
    id<MTLComputePipelineState> state = [device() newComputePipelineStateWithFunction:function(kernel) error:&error];
    TORCH_CHECK(state, "metalq: Metal cannot build the pipeline of kernel ", kernel, ": ", error_text(error));
    return cache[kernel] = state;
  }
}

void encode(const DispatchPlan& planned) {
  // Outside the stream's queue: building a pipeline may compile and may throw.
  id<MTLComputePipelineState> state = pipeline(planned.kernel);
  const DispatchPlan plan = fit_thread_limit(planned, state.maxTotalThreadsPerThreadgroup);
  const DispatchPlan* p = &plan;  // the block runs before encode returns
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  // dispatch_sync cannot carry a C++ exception out of its block: catch it there, rethrow here.
  __block std::exception_ptr failure;
  dispatch_sync(stream->queue(), ^{
    @autoreleasepool {
      try {
        // The stream's shared encoder: never endEncoding, never commit (torch does at its sync points).
        id<MTLComputeCommandEncoder> encoder = stream->commandEncoder();
        [encoder setComputePipelineState:state];
        for (const BufferBinding& b : p->buffers) {
          // An MPS tensor's storage is a whole MTLBuffer; the tensor may start inside it.
          [encoder setBuffer:(__bridge id<MTLBuffer>)b.tensor.storage().data()
                      offset:b.tensor.storage_offset() * b.tensor.element_size()
                     atIndex:b.index];
        }
        for (const BytesBinding& b : p->bytes) {
          [encoder setBytes:b.bytes.data() length:b.bytes.size() atIndex:b.index];
        }
        for (const auto& [index, length] : p->threadgroup_memory) {
          [encoder setThreadgroupMemoryLength:length atIndex:index];
        }
        const auto& g = p->threadgroups;
        const auto& t = p->threads_per_threadgroup;
        [encoder dispatchThreadgroups:MTLSizeMake(g[0], g[1], g[2])
                threadsPerThreadgroup:MTLSizeMake(t[0], t[1], t[2])];
      } catch (...) {
        failure = std::current_exception();
      }
    }
  });
  if (failure) std::rethrow_exception(failure);
}

}  // namespace metalq::mps
