using System.Diagnostics;
using System.Runtime.InteropServices;

namespace OffloadRpc.Interop;

/// <summary>
/// Owns one file descriptor: a memfd this process created, or a descriptor the peer passed with
/// SCM_RIGHTS (which counts as a memfd only once <see cref="Transport.SharedMemorySegment.MapPeer"/>
/// has checked it). It is closed exactly once: by <see cref="SafeHandle.Dispose()"/>, or by the
/// finalizer if it was dropped. A call that takes the handle (the <see cref="LinuxNative"/> overloads,
/// <see cref="Transport.SocketChannel.Send"/>) holds a reference on it for the duration of the syscall,
/// so a concurrent Dispose cannot close the number under the call and let the process reuse it.
/// </summary>
internal sealed class SafeMemfdHandle : SafeHandle
{
    /// <summary>An invalid handle (-1), for the marshaller to fill (<see cref="LinuxNative.MemfdCreateHandle"/>).</summary>
    public SafeMemfdHandle()
        : base(invalidHandleValue: -1, ownsHandle: true)
    {
    }

    /// <summary>Takes ownership of <paramref name="fd"/> (a descriptor just received, owned by nobody else).</summary>
    public SafeMemfdHandle(int fd)
        : this()
    {
        SetHandle(fd);
    }

    /// <summary>-1 (what memfd_create returns on failure), or any negative number: no descriptor.</summary>
    public override bool IsInvalid => handle < 0;

    protected override bool ReleaseHandle()
    {
        // close() is not retried on EINTR: on Linux the descriptor is released either way, and a
        // retry could close a number another thread has been given since.
        int result = LinuxNative.Close((int)handle);
        Debug.Assert(result == 0 || Marshal.GetLastPInvokeError() == LinuxNative.EINTR, $"close({handle}) failed with errno {Marshal.GetLastPInvokeError()}: closed twice?");
        return result == 0;
    }
}
