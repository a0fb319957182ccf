// Stub of <Metal/Metal.h> for the Linux syntax check: the symbols csrc/mps and torch's MPS headers
// use, with the SDK's signatures; see ../README.
#pragma once

#import <Foundation/Foundation.h>

#pragma clang assume_nonnull begin  // as the SDK headers (NS_ASSUME_NONNULL_BEGIN)

typedef struct {
  NSUInteger width, height, depth;
} MTLSize;
static inline MTLSize MTLSizeMake(NSUInteger width, NSUInteger height, NSUInteger depth) {
  MTLSize size = {width, height, depth};
  return size;
}

typedef enum MTLLanguageVersion : NSUInteger {
  MTLLanguageVersion3_1 __attribute__((availability(macos, introduced = 14.0))) = (3 << 16) + 1,
} MTLLanguageVersion;

typedef enum MTLMathMode : NSInteger {
  MTLMathModeSafe = 0,
  MTLMathModeRelaxed = 1,
  MTLMathModeFast = 2,
} MTLMathMode __attribute__((availability(macos, introduced = 15.0)));

typedef enum MTLMathFloatingPointFunctions : NSInteger {
  MTLMathFloatingPointFunctionsFast = 0,
  MTLMathFloatingPointFunctionsPrecise = 1,
} MTLMathFloatingPointFunctions __attribute__((availability(macos, introduced = 15.0)));

@protocol MTLFunction <NSObject>
@end

@protocol MTLLibrary <NSObject>
- (nullable id<MTLFunction>)newFunctionWithName:(NSString*)functionName;
@end

@protocol MTLComputePipelineState <NSObject>
@property(readonly) NSUInteger maxTotalThreadsPerThreadgroup;
@end

@protocol MTLBuffer <NSObject>
@end

@protocol MTLSharedEvent <NSObject>
@end

@interface MTLCompileOptions : NSObject
@property(readwrite, nonatomic) MTLLanguageVersion languageVersion;
@property(readwrite, nonatomic) BOOL fastMathEnabled
    __attribute__((availability(macos, introduced = 10.11, deprecated = 15.0, message = "Use mathMode instead")));
@property(readwrite, nonatomic) MTLMathMode mathMode __attribute__((availability(macos, introduced = 15.0)));
@property(readwrite, nonatomic) MTLMathFloatingPointFunctions mathFloatingPointFunctions
    __attribute__((availability(macos, introduced = 15.0)));
@end

@protocol MTLDevice <NSObject>
- (nullable id<MTLLibrary>)newLibraryWithURL:(NSURL*)url error:(__autoreleasing NSError**)error;
- (nullable id<MTLLibrary>)newLibraryWithSource:(NSString*)source
                                        options:(nullable MTLCompileOptions*)options
                                          error:(__autoreleasing NSError**)error;
- (nullable id<MTLComputePipelineState>)newComputePipelineStateWithFunction:(id<MTLFunction>)computeFunction
                                                                      error:(__autoreleasing NSError**)error;
@end

// No endEncoding / commit: csrc/mps must use neither (the MPS stream owns both).
@protocol MTLCommandEncoder <NSObject>
@end

@protocol MTLComputeCommandEncoder <MTLCommandEncoder>
- (void)setComputePipelineState:(id<MTLComputePipelineState>)state;
- (void)setBytes:(const void*)bytes length:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)setBuffer:(nullable id<MTLBuffer>)buffer offset:(NSUInteger)offset atIndex:(NSUInteger)index;
- (void)setThreadgroupMemoryLength:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)dispatchThreadgroups:(MTLSize)threadgroupsPerGrid threadsPerThreadgroup:(MTLSize)threadsPerThreadgroup;
@end

@protocol MTLCommandBuffer <NSObject>
@end
typedef void (^MTLCommandBufferHandler)(id<MTLCommandBuffer>);

@protocol MTLCommandQueue <NSObject>
@end

#pragma clang assume_nonnull end
