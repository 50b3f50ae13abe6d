using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>Socket frame types. The socket carries the handshake, segment hand-over, and liveness (EOF).</summary>
internal enum FrameType : ushort
{
    /// <summary>Client to server: version, geometry, contracts; the client's control area attached.</summary>
    Hello = 1,

    /// <summary>Server to client: the served contracts; the server's control area attached.</summary>
    Welcome = 2,

    /// <summary>Server to client: the handshake is refused (a <see cref="RejectReason"/> and a message).</summary>
    Reject = 3,

    /// <summary>A new arena segment (id, size), its memfd attached.</summary>
    AddSegment = 4,

    /// <summary>The peer mapped the segment it was handed (id).</summary>
    SegmentMapped = 5,

    /// <summary>A segment the peer may unmap (id): its owner retired it.</summary>
    RemoveSegment = 6,
}

/// <summary>What <see cref="SocketChannel.TryReceive"/> found.</summary>
internal enum FrameStatus
{
    /// <summary>A whole frame: its type, payload and descriptors are out.</summary>
    Frame,

    /// <summary>Nothing more to read now (a partial frame is kept, descriptors included).</summary>
    WouldBlock,

    /// <summary>The peer closed its socket or died (a partial frame's descriptors are closed).</summary>
    EndOfStream,
}

/// <summary>
/// Length-prefixed frames over a connected, non-blocking Unix stream socket, with file descriptors
/// attached (SCM_RIGHTS) and owned by <see cref="SafeMemfdHandle"/>s on both ends. Frame: u32 payload
/// length, u16 type, u16 reserved, payload. Reads never block: a partial frame (and the descriptors
/// that came with it) waits in the channel until the rest arrives, and the process's
/// <see cref="SocketReactor"/> says when to read again. Sends are serialized by a lock and bounded by a
/// deadline: a peer that stops reading its socket cannot hold a sender forever.
/// </summary>
internal sealed class SocketChannel : IDisposable
{
    public const int HeaderSize = 8;
    public const int MaxFrameLength = 64 * 1024;

    private readonly Socket _socket;
    private readonly object _sendLock = new();
    private readonly object _receiveLock = new();
    private readonly byte[] _receiveBuffer = new byte[HeaderSize + MaxFrameLength];
    private readonly SafeMemfdHandle?[] _pending = new SafeMemfdHandle?[LinuxNative.MaxFdsPerMessage];
    private SocketRegistration? _registration;
    private int _filled;
    private int _frameLength = -1;
    private int _pendingCount;
    private int _disposed;

    public SocketChannel(Socket socket)
    {
        _socket = socket;
        _socket.Blocking = false;
        // recvmsg/sendmsg are called directly: make sure the descriptor itself is non-blocking,
        // whatever .NET did to it.
        int fd = (int)socket.SafeHandle.DangerousGetHandle();
        int flags = LinuxNative.Fcntl(fd, LinuxNative.F_GETFL, 0);
        if (flags >= 0 && (flags & LinuxNative.O_NONBLOCK) == 0)
        {
            LinuxNative.Fcntl(fd, LinuxNative.F_SETFL, flags | LinuxNative.O_NONBLOCK);
        }
    }

    /// <summary>The socket's place in the process's <see cref="SocketReactor"/> (registered on first use).</summary>
    public SocketRegistration Registration
    {
        get
        {
            if (_registration is { } registration)
            {
                return registration;
            }

            ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
            lock (_sendLock)
            {
                return _registration ??= SocketReactor.Shared.Register(_socket.SafeHandle);
            }
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
    /// side keeps its own). While the socket buffer is full it waits for room, at most
    /// <paramref name="timeout"/> (zero: not at all).
    /// </summary>
    /// <exception cref="PeerDisconnectedException">The peer is gone.</exception>
    /// <exception cref="TimeoutException">The peer did not read its socket within <paramref name="timeout"/>.</exception>
    public void Send(FrameType type, ReadOnlySpan<byte> payload, SafeMemfdHandle? descriptor, TimeSpan timeout)
    {
        if (payload.Length > MaxFrameLength)
        {
            throw new ArgumentOutOfRangeException(nameof(payload), "Frame too large.");
        }

        Debug.Assert(descriptor is null || !descriptor.IsInvalid, "only a valid descriptor is passed to the peer");
        byte[] frame = new byte[HeaderSize + payload.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(frame, (uint)payload.Length);
        BinaryPrimitives.WriteUInt16LittleEndian(frame.AsSpan(4), (ushort)type);
        payload.CopyTo(frame.AsSpan(HeaderSize));
        Span<int> fds = stackalloc int[1];
        long deadline = timeout == Timeout.InfiniteTimeSpan ? long.MaxValue : Stopwatch.GetTimestamp() + (long)(timeout.TotalSeconds * Stopwatch.Frequency);
        lock (_sendLock)
        {
            ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
            bool acquired = TryAcquireDescriptor(out int fd);
            ObjectDisposedException.ThrowIf(!acquired, this);

            bool passing = false;
            try
            {
                if (descriptor is not null)
                {
                    // A reference for the syscall: a concurrent Dispose of the handle cannot close the
                    // number (and the process reuse it for something else) while sendmsg copies it.
                    descriptor.DangerousAddRef(ref passing);
                    fds[0] = (int)descriptor.DangerousGetHandle();
                }

                int sent = 0;
                while (sent < frame.Length)
                {
                    int n = LinuxNative.SendSome(fd, frame.AsSpan(sent), sent == 0 && passing ? fds : default);
                    if (n > 0)
                    {
                        sent += n;
                        continue;
                    }

                    if (n != -LinuxNative.EAGAIN)
                    {
                        throw new PeerDisconnectedException($"The peer's socket is closed (send failed, errno {-n}).");
                    }

                    long remaining = deadline - Stopwatch.GetTimestamp();
                    if (remaining <= 0)
                    {
                        throw new TimeoutException($"The peer has not read its socket for {timeout.TotalSeconds:0.###} s (its buffer is full).");
                    }

                    LinuxNative.Poll(fd, LinuxNative.POLLOUT, (int)Math.Min(int.MaxValue, (remaining * 1000 / Stopwatch.Frequency) + 1));
                }
            }
            finally
            {
                if (passing)
                {
                    descriptor!.DangerousRelease();
                }

                ReleaseDescriptor();
            }
        }
    }

    /// <summary>
    /// Reads what the socket holds, without blocking, until a whole frame is in. On
    /// <see cref="FrameStatus.Frame"/> the payload is valid until the next call and the descriptors that
    /// came with it are the caller's (it takes those it keeps and disposes the rest). One reader at a time.
    /// </summary>
    /// <exception cref="ProtocolViolationException">A malformed frame.</exception>
    public FrameStatus TryReceive(out FrameType type, out ReadOnlySpan<byte> payload, out ReceivedDescriptors descriptors)
    {
        type = 0;
        payload = default;
        descriptors = default;
        lock (_receiveLock) // one reader at a time; Dispose may run on another thread
        {
            if (Volatile.Read(ref _disposed) != 0)
            {
                return FrameStatus.EndOfStream;
            }

            return TryReceiveLocked(out type, out payload, out descriptors);
        }
    }

    private FrameStatus TryReceiveLocked(out FrameType type, out ReadOnlySpan<byte> payload, out ReceivedDescriptors descriptors)
    {
        type = 0;
        payload = default;
        descriptors = default;
        try
        {
            while (true)
            {
                int want = _frameLength < 0 ? HeaderSize - _filled : HeaderSize + _frameLength - _filled;
                if (want == 0)
                {
                    type = (FrameType)BinaryPrimitives.ReadUInt16LittleEndian(_receiveBuffer.AsSpan(4));
                    payload = _receiveBuffer.AsSpan(HeaderSize, _frameLength);
                    descriptors = TakePending();
                    _filled = 0;
                    _frameLength = -1;
                    return FrameStatus.Frame;
                }

                int n = ReceiveSome(_receiveBuffer.AsSpan(_filled, want));
                if (n == 0)
                {
                    DropPartialFrame();
                    return FrameStatus.EndOfStream;
                }

                if (n < 0)
                {
                    return FrameStatus.WouldBlock;
                }

                _filled += n;
                if (_frameLength < 0 && _filled == HeaderSize)
                {
                    uint length = BinaryPrimitives.ReadUInt32LittleEndian(_receiveBuffer);
                    if (length > MaxFrameLength)
                    {
                        throw new ProtocolViolationException($"The peer sent a socket frame of {length} bytes (limit {MaxFrameLength}).");
                    }

                    _frameLength = (int)length;
                }
            }
        }
        catch
        {
            DropPartialFrame();
            throw;
        }
    }

    /// <summary>
    /// Waits, without a thread, for the next whole frame (the handshake's way of reading). Its payload is
    /// valid until the next read; its descriptors are the caller's.
    /// </summary>
    /// <returns>False at end of stream.</returns>
    /// <param name="inline">Resume on the reactor's thread (see <see cref="SocketRegistration.WaitAsync"/>).</param>
    public async ValueTask<bool> ReceiveAsync(FrameHolder holder, CancellationToken cancellationToken, bool inline = false)
    {
        while (true)
        {
            if (TryReceiveInto(holder) is var status && status != FrameStatus.WouldBlock)
            {
                return status == FrameStatus.Frame;
            }

            await Registration.WaitAsync(write: false, cancellationToken, inline).ConfigureAwait(false);
        }
    }

    private FrameStatus TryReceiveInto(FrameHolder holder)
    {
        FrameStatus status = TryReceive(out FrameType type, out ReadOnlySpan<byte> payload, out ReceivedDescriptors descriptors);
        if (status == FrameStatus.Frame)
        {
            holder.Type = type;
            holder.Payload = payload.ToArray();
            holder.Descriptors = descriptors;
        }

        return status;
    }

    /// <summary>One recvmsg: bytes read, 0 at end of stream, -1 when nothing is there now. Descriptors go to the partial frame at once.</summary>
    private int ReceiveSome(Span<byte> buffer)
    {
        if (!TryAcquireDescriptor(out int fd))
        {
            return 0;
        }

        Span<int> raw = stackalloc int[LinuxNative.MaxFdsPerMessage];
        int n;
        int received;
        bool truncated;
        try
        {
            n = LinuxNative.ReceiveWithFds(fd, buffer, raw[..(LinuxNative.MaxFdsPerMessage - _pendingCount)], out received, out truncated);
        }
        finally
        {
            ReleaseDescriptor();
        }

        // Owned by handles from here on: whatever happens next, the partial frame's cleanup closes them.
        Debug.Assert(_pendingCount + received <= LinuxNative.MaxFdsPerMessage, "recvmsg stores no more descriptors than it was given room for");
        for (int i = 0; i < received; i++)
        {
            _pending[_pendingCount++] = new SafeMemfdHandle(raw[i]);
        }

        if (truncated)
        {
            throw new ProtocolViolationException("The peer sent more file descriptors than a frame may carry.");
        }

        // Only sealable memfds are ever passed. Anything else is refused at once, before a partial frame
        // could keep it: a peer that attached its own socket and then died would otherwise never be seen
        // to die (we would hold its end open), and a pipe or a file has no business here.
        for (int i = _pendingCount - received; i < _pendingCount; i++)
        {
            if (LinuxNative.Fcntl(_pending[i]!, LinuxNative.F_GET_SEALS, 0) < 0)
            {
                throw new ProtocolViolationException("The peer passed a file descriptor that is not a shared-memory segment.");
            }
        }

        if (n >= 0)
        {
            return n;
        }

        if (-n == LinuxNative.EAGAIN)
        {
            return -1;
        }

        if (Volatile.Read(ref _disposed) != 0)
        {
            return 0;
        }

        throw new PeerDisconnectedException($"Reading the peer's socket failed (errno {-n}).");
    }

    private ReceivedDescriptors TakePending()
    {
        if (_pendingCount == 0)
        {
            return default;
        }

        var handles = new SafeMemfdHandle?[_pendingCount];
        for (int i = 0; i < _pendingCount; i++)
        {
            handles[i] = _pending[i];
            _pending[i] = null;
        }

        var descriptors = new ReceivedDescriptors(handles, _pendingCount);
        _pendingCount = 0;
        return descriptors;
    }

    /// <summary>A frame that will never be completed: its descriptors are closed (a peer cannot leave them with us).</summary>
    private void DropPartialFrame()
    {
        TakePending().Dispose();
        _filled = 0;
        _frameLength = -1;
    }

    /// <summary>Test hook: the raw socket descriptor (a malicious peer sends it to the other side).</summary>
    internal int DescriptorForTests => (int)_socket.SafeHandle.DangerousGetHandle();

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

    /// <summary>Ends both directions: the reactor reports the socket, whose reads then see end of stream, and the peer sees we are gone.</summary>
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
            Volatile.Read(ref _registration)?.Remove(); // out of epoll before the number can be reused
            Shutdown();
            lock (_sendLock)
            {
                _socket.Dispose();
            }

            lock (_receiveLock)
            {
                DropPartialFrame(); // descriptors of a frame that will never complete are closed, not kept
            }
        }
    }
}

/// <summary>A frame read by <see cref="SocketChannel.ReceiveAsync"/>: its payload copied, its descriptors owned by the reader.</summary>
internal sealed class FrameHolder : IDisposable
{
    public FrameType Type { get; set; }

    public byte[] Payload { get; set; } = [];

    public ReceivedDescriptors Descriptors { get; set; }

    /// <summary>Closes the descriptors nobody took.</summary>
    public void Dispose() => Descriptors.Dispose();
}
