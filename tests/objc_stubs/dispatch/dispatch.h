// Stub of <dispatch/dispatch.h> (libdispatch) for the Linux syntax check; see ../README.
#pragma once

#include <stddef.h>

#import <Foundation/NSObject.h>

#pragma clang assume_nonnull begin  // as the SDK headers (NS_ASSUME_NONNULL_BEGIN)

// With ARC, dispatch objects are Objective-C objects (OS_OBJECT_USE_OBJC).
@protocol OS_dispatch_object <NSObject>
@end
@protocol OS_dispatch_queue <OS_dispatch_object>
@end
typedef NSObject<OS_dispatch_queue>* dispatch_queue_t;
typedef void (^dispatch_block_t)(void);

extern "C" {
void dispatch_sync(dispatch_queue_t queue, dispatch_block_t block);
}

#pragma clang assume_nonnull end
