// Stub of the Foundation root class and scalar types for the Linux syntax check; see ../README.
#pragma once

#pragma clang assume_nonnull begin  // as the SDK headers (NS_ASSUME_NONNULL_BEGIN)

typedef unsigned long NSUInteger;
typedef long NSInteger;
typedef bool BOOL;
#define YES __objc_yes
#define NO __objc_no
#define nil nullptr  // <objc/objc.h> (C++: __DARWIN_NULL)

@protocol NSObject
@end

__attribute__((objc_root_class))
@interface NSObject <NSObject>
+ (instancetype)alloc;
+ (instancetype)new;
- (instancetype)init;
@end

#pragma clang assume_nonnull end
