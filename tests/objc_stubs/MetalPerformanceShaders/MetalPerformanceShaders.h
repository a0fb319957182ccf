// Stub of <MetalPerformanceShaders/MetalPerformanceShaders.h>: what ATen/mps/MPSStream.h names; see ../README.
#pragma once

#import <Metal/Metal.h>

#pragma clang assume_nonnull begin  // as the SDK headers (NS_ASSUME_NONNULL_BEGIN)

@interface MPSCommandBuffer : NSObject <MTLCommandBuffer>
@end

#pragma clang assume_nonnull end
