// Stub of <MetalPerformanceShadersGraph/MetalPerformanceShadersGraph.h>: what ATen/mps/MPSStream.h names; see ../README.
#pragma once

#import <MetalPerformanceShaders/MetalPerformanceShaders.h>

#pragma clang assume_nonnull begin  // as the SDK headers (NS_ASSUME_NONNULL_BEGIN)

@interface MPSGraph : NSObject
@end
@interface MPSGraphExecutionDescriptor : NSObject
@end
@interface MPSGraphCompilationDescriptor : NSObject
@end

#pragma clang assume_nonnull end
