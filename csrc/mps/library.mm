// metalq's Metal library (embedded metallib, else embedded sources compiled at first use), the
// pipeline cache, and the DispatchPlan encoder (pattern: reference §3.4 / DESIGN.md).
#include "library.h"

#include <ATen/mps/MPSDevice.h>
#include <ATen/mps/MPSStream.h>
#include <c10/util/Exception.h>

#include <mutex>
#include <unordered_map>
#include <vector>

// Generated at build time by tools/embed_metal.py (setup.py): a metallib, or the metal/ sources.
#include "metalq_metal_embed.h"

#if !__has_feature(objc_arc)
#error "csrc/mps is written for ARC: compile with -fobjc-arc"
#endif

namespace metalq::mps {
namespace {

std::string error_text(NSError* error) {
  return error ? std::string([[error localizedDescription] UTF8String]) : std::string("no error details");
}

// One library per embedded blob: the metallib, or each metal/*.metal source compiled as Metal 3.1
// (macOS 14+, bfloat) without fast math, the same roundings as the metallib built with -fno-fast-math.
std::vector<id<MTLLibrary>> load_libraries() {
  id<MTLDevice> device = at::mps::MPSDevice::getInstance()->device();
  std::vector<id<MTLLibrary>> libraries;
  for (const embedded::Blob& blob : embedded::kBlobs) {
    NSError* error = nil;
    id<MTLLibrary> library = nil;
    if (embedded::kIsMetallib) {
      dispatch_data_t data = dispatch_data_create(blob.data, blob.size, nullptr, DISPATCH_DATA_DESTRUCTOR_DEFAULT);
      library = [device newLibraryWithData:data error:&error];
    } else {
      MTLCompileOptions* options = [MTLCompileOptions new];
      options.languageVersion = MTLLanguageVersion3_1;
      if (@available(macOS 15.0, *)) {
        options.mathMode = MTLMathModeSafe;
      } else {
        options.fastMathEnabled = NO;
      }
      NSString* source = [[NSString alloc] initWithBytes:blob.data length:blob.size encoding:NSUTF8StringEncoding];
      library = [device newLibraryWithSource:source options:options error:&error];
    }
    TORCH_CHECK(library, "metalq: cannot load the Metal library ", blob.name, ": ", error_text(error));
    libraries.push_back(library);
  }
  return libraries;
}

}  // namespace

id<MTLComputePipelineState> pipeline(const std::string& kernel) {
  static std::mutex mutex;
  static std::unordered_map<std::string, id<MTLComputePipelineState>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = cache.find(kernel); it != cache.end()) return it->second;
  @autoreleasepool {
    // Loaded (or compiled) once per process, on first use; a failure throws and is retried next call.
    static const std::vector<id<MTLLibrary>> libraries = load_libraries();
    NSString* name = [NSString stringWithUTF8String:kernel.c_str()];
    id<MTLFunction> function = nil;
    for (id<MTLLibrary> library : libraries) {
      if ((function = [library newFunctionWithName:name])) break;
    }
    TORCH_CHECK(function, "metalq: kernel ", kernel, " is not in the Metal library (see metal/quantized.metal)");
    NSError* error = nil;
    id<MTLComputePipelineState> state =
        [at::mps::MPSDevice::getInstance()->device() newComputePipelineStateWithFunction:function error:&error];
    TORCH_CHECK(state, "metalq: cannot build the pipeline of ", kernel, ": ", error_text(error));
    return cache[kernel] = state;
  }
}

void encode(const DispatchPlan& plan) {
  // Outside the stream's queue: building a pipeline may compile and may throw.
  id<MTLComputePipelineState> state = pipeline(plan.kernel);
  const auto& tg = plan.threads_per_threadgroup;
  TORCH_INTERNAL_ASSERT(uint64_t(tg[0]) * tg[1] * tg[2] <= state.maxTotalThreadsPerThreadgroup, plan.kernel,
                        " allows ", state.maxTotalThreadsPerThreadgroup, " threads per threadgroup");
  const DispatchPlan* p = &plan;  // the block runs before encode returns
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  at::mps::dispatch_sync_with_rethrow(stream->queue(), ^{
    @autoreleasepool {
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
      [encoder dispatchThreadgroups:MTLSizeMake(g[0], g[1], g[2]) threadsPerThreadgroup:MTLSizeMake(t[0], t[1], t[2])];
    }
  });
}

}  // namespace metalq::mps
