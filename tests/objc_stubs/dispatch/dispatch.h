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
@protocol OS_dispatch_data <OS_dispatch_object>
@end
typedef NSObject<OS_dispatch_queue>* dispatch_queue_t;
typedef NSObject<OS_dispatch_data>* dispatch_data_t;
typedef void (^dispatch_block_t)(void);

#define DISPATCH_DATA_DESTRUCTOR_DEFAULT NULL

extern "C" {
dispatch_data_t dispatch_data_create(const void* buffer, size_t size, dispatch_queue_t _Nullable queue,
                                     dispatch_block_t _Nullable destructor);
void dispatch_sync(dispatch_queue_t queue, dispatch_block_t block);
}

#pragma clang assume_nonnull end
