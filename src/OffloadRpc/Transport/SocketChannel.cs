using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>
/// Length-prefixed frames over a connected Unix stream socket, with file descriptors attached
/// (SCM_RIGHTS) and owned by <see cref="SafeMemfdHandle"/>s on both ends. Frame: u32 payload length,
/// u16 type, u16 reserved, payload. One reader thread;
/// senders are serialized by a lock (frames are rare: handshake and segment hand-over).
/// </summary>
internal sealed class SocketChannel : IDisposable
{
    public const int HeaderSize = 8;
    public const int MaxFrameLength = 64 * 1024;

    private readonly Socket _socket;
    private readonly object _sendLock = new();
    private readonly byte[] _receiveBuffer = new byte[HeaderSize + MaxFrameLength];
    private int _disposed;

    public SocketChannel(Socket socket)
    {
        _socket = socket;
        _socket.Blocking = true;
        // The connection threads call recvmsg/sendmsg directly and rely on blocking semantics,
        // whatever .NET did to the descriptor (an accepted socket may inherit O_NONBLOCK).
        int fd = (int)socket.SafeHandle.DangerousGetHandle();
        int flags = LinuxNative.Fcntl(fd, LinuxNative.F_GETFL, 0);
        if (flags >= 0 && (flags & LinuxNative.O_NONBLOCK) != 0)
        {
            LinuxNative.Fcntl(fd, LinuxNative.F_SETFL, flags & ~LinuxNative.O_NONBLOCK);
        }
    }

    /// <summary>
    /// Takes a reference on the socket handle for the duration of a raw call, so that a concurrent
    /// Dispose cannot close the descriptor (and the process reuse its number) under the call.
    /// </summary>
    private bool TryAcquireDescriptor(out int fd)
    {
        bool added = false;
        try
        {
            _socket.SafeHandle.DangerousAddRef(ref added);
        }
        catch (ObjectDisposedException)
        {
        }

        fd = added ? (int)_socket.SafeHandle.DangerousGetHandle() : -1;
        return added;
    }

    private void ReleaseDescriptor() => _socket.SafeHandle.DangerousRelease();

    /// <summary>
    /// Sends one frame, with <paramref name="descriptor"/> attached (the peer receives a duplicate; this
    /// side keeps its own). Throws <see cref="PeerDisconnectedException"/> when the peer is gone.
    /// </summary>
    public void Send(FrameType type, ReadOnlySpan<byte> payload, SafeMemfdHandle? descriptor = null)
    {
        if (payload.Length > MaxFrameLength)
        {
            throw new ArgumentOutOfRangeException(nameof(payload), "Frame too large.");
        }

        Debug.Assert(descriptor is null || !descriptor.IsInvalid, "only a valid descriptor is passed to the peer");
        Span<byte> frame = stackalloc byte[HeaderSize + payload.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(frame, (uint)payload.Length);
        BinaryPrimitives.WriteUInt16LittleEndian(frame[4..], (ushort)type);
        BinaryPrimitives.WriteUInt16LittleEndian(frame[6..], 0);
        payload.CopyTo(frame[HeaderSize..]);
        Span<int> fds = stackalloc int[1];
        lock (_sendLock)
        {
            ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);

            bool acquired = TryAcquireDescriptor(out int fd);
            ObjectDisposedException.ThrowIf(!acquired, this);

            bool passing = false;
            int errno;
            try
            {
                if (descriptor is not null)
                {
                    // A reference for the syscall: a concurrent Dispose of the handle cannot close the
                    // number (and the process reuse it for something else) while sendmsg copies it.
                    descriptor.DangerousAddRef(ref passing);
                    fds[0] = (int)descriptor.DangerousGetHandle();
                }

                errno = LinuxNative.SendWithFds(fd, frame, passing ? fds : default);
            }
            finally
            {
                if (passing)
                {
                    descriptor!.DangerousRelease();
                }

                ReleaseDescriptor();
            }

            if (errno != 0)
            {
                throw new PeerDisconnectedException($"The peer's socket is closed (send failed, errno {errno}).");
            }
        }
    }

    /// <summary>
    /// Reads one frame. The returned payload is valid until the next call. Descriptors that came with it
    /// are in <paramref name="descriptors"/>, owned by handles: the caller takes those it keeps and
    /// disposes the rest. On false or an exception none is left open.
    /// </summary>
    /// <returns>False at end of stream (the peer closed its socket or died).</returns>
    /// <exception cref="ProtocolViolationException">A malformed frame.</exception>
    public bool TryReceive(out FrameType type, out ReadOnlySpan<byte> payload, out ReceivedDescriptors descriptors)
    {
        type = 0;
        payload = default;
        descriptors = default;
        SafeMemfdHandle?[]? handles = null;
        int count = 0;
        try
        {
            if (!ReadExactly(_receiveBuffer.AsSpan(0, HeaderSize), ref handles, ref count))
            {
                new ReceivedDescriptors(handles, count).Dispose();
                return false;
            }

            uint length = BinaryPrimitives.ReadUInt32LittleEndian(_receiveBuffer);
            type = (FrameType)BinaryPrimitives.ReadUInt16LittleEndian(_receiveBuffer.AsSpan(4));
            if (length > MaxFrameLength)
            {
                throw new ProtocolViolationException($"The peer sent a socket frame of {length} bytes (limit {MaxFrameLength}).");
            }

            if (!ReadExactly(_receiveBuffer.AsSpan(HeaderSize, (int)length), ref handles, ref count))
            {
                throw new PeerDisconnectedException("The peer closed its socket in the middle of a frame.");
            }

            payload = _receiveBuffer.AsSpan(HeaderSize, (int)length);
            descriptors = new ReceivedDescriptors(handles, count);
            return true;
        }
        catch
        {
            new ReceivedDescriptors(handles, count).Dispose();
            throw;
        }
    }

    /// <summary>Reads all of <paramref name="buffer"/>; descriptors that arrive on the way are wrapped in handles as soon as recvmsg returns them.</summary>
    private bool ReadExactly(Span<byte> buffer, ref SafeMemfdHandle?[]? handles, ref int count)
    {
        Span<int> raw = stackalloc int[LinuxNative.MaxFdsPerMessage];
        int read = 0;
        while (read < buffer.Length)
        {
            if (!TryAcquireDescriptor(out int fd))
            {
                return false;
            }

            int n;
            int received;
            bool truncated;
            try
            {
                n = LinuxNative.ReceiveWithFds(fd, buffer[read..], raw[..(LinuxNative.MaxFdsPerMessage - count)], out received, out truncated);
            }
            finally
            {
                ReleaseDescriptor();
            }

            // Owned by handles from here on: whatever happens next, the caller's cleanup closes them.
            Debug.Assert(count + received <= LinuxNative.MaxFdsPerMessage, "recvmsg stores no more descriptors than it was given room for");
            if (received > 0)
            {
                handles ??= new SafeMemfdHandle?[LinuxNative.MaxFdsPerMessage];
                for (int i = 0; i < received; i++)
                {
                    handles[count++] = new SafeMemfdHandle(raw[i]);
                }
            }

            if (truncated)
            {
                throw new ProtocolViolationException("The peer sent more file descriptors than a frame may carry.");
            }

            if (n == 0)
            {
                return false;
            }

            if (n < 0)
            {
                if (-n == LinuxNative.EAGAIN)
                {
                    throw new TimeoutException("The peer did not answer within the handshake timeout.");
                }

                if (Volatile.Read(ref _disposed) != 0)
                {
                    return false;
                }

                throw new PeerDisconnectedException($"Reading the peer's socket failed (errno {-n}).");
            }

            read += n;
        }

        return true;
    }

    /// <summary>Sets SO_RCVTIMEO so that handshake reads cannot hang; zero restores blocking reads.</summary>
    public void SetReceiveTimeout(TimeSpan timeout)
    {
        Span<byte> timeval = stackalloc byte[16];
        long micros = timeout <= TimeSpan.Zero ? 0 : (long)timeout.TotalMicroseconds;
        BinaryPrimitives.WriteInt64LittleEndian(timeval, micros / 1_000_000);
        BinaryPrimitives.WriteInt64LittleEndian(timeval[8..], micros % 1_000_000);
        _socket.SetRawSocketOption(LinuxNative.SOL_SOCKET, 20 /* SO_RCVTIMEO */, timeval);
    }

    /// <summary>The peer's process id, user id and group id (SO_PEERCRED).</summary>
    public (int Pid, uint Uid, uint Gid) GetPeerCredentials()
    {
        Span<byte> ucred = stackalloc byte[12];
        int length = _socket.GetRawSocketOption(LinuxNative.SOL_SOCKET, LinuxNative.SO_PEERCRED, ucred);
        if (length < 12)
        {
            throw new OffloadRpcException("SO_PEERCRED returned a short answer.");
        }

        return (BinaryPrimitives.ReadInt32LittleEndian(ucred), BinaryPrimitives.ReadUInt32LittleEndian(ucred[4..]), BinaryPrimitives.ReadUInt32LittleEndian(ucred[8..]));
    }

    /// <summary>Wakes a reader blocked in <see cref="TryReceive"/> (it sees end of stream) and tells the peer we are gone.</summary>
    public void Shutdown()
    {
        try
        {
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (SocketException)
        {
        }
        catch (ObjectDisposedException)
        {
        }
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 0)
        {
            Shutdown();
            lock (_sendLock)
            {
                _socket.Dispose();
            }
        }
    }
}
