using System.Buffers;
using System.Diagnostics;
using OffloadRpc.Transport;

namespace OffloadRpc;

/// <summary>
/// A lease on a block of a connection's shared memory. Write into it in place and pass it to a call:
/// ownership moves to the receiver and no byte is copied. Dispose returns the block; a lease that was
/// passed on is already disposed. Not thread-safe; <see cref="Length"/> is exactly the size rented.
/// </summary>
/// <remarks>
/// <see cref="Memory"/> and <see cref="Span"/> point into shared memory. Once the lease is disposed or
/// passed on, they throw <see cref="ObjectDisposedException"/>; do not keep a <see cref="Span{T}"/>
/// across a call that passes the lease on.
/// </remarks>
public sealed unsafe class SharedBuffer : IDisposable
{
    private readonly ILeaseHost _host;
    private readonly SharedMemorySegment _segment;
    private readonly long _offset;
    private readonly int _length;
    private int _state; // Live, Gone (disposed, or sent on for good), or Detached (being sent on: back to Live if the send fails)

    private const int Live = 0;
    private const int Gone = 1;
    private const int Detached = 2;
    private Manager<byte>? _manager;

    internal SharedBuffer(ILeaseHost host, SharedMemorySegment segment, long offset, int length, bool ownedBySender, long? blockOffset = null)
    {
        _host = host;
        _segment = segment;
        _offset = offset;
        _length = length;
        IsOwnArena = ownedBySender;
        BlockOffset = blockOffset ?? offset;
        Debug.Assert(segment.IsMapped, "the creator hands the lease a mapping reference it took");
        _ = segment.Pointer(offset, length); // bounds check once; the segment reference is taken by the creator
    }

    /// <summary>The number of bytes of the lease.</summary>
    public int Length => _length;

    /// <summary>The lease's bytes, in shared memory.</summary>
    public Memory<byte> Memory
    {
        get
        {
            ThrowIfGone();
            return (_manager ??= new Manager<byte>(this)).Memory;
        }
    }

    /// <summary>The lease's bytes, in shared memory.</summary>
    public Span<byte> Span
    {
        get
        {
            ThrowIfGone();
            return new Span<byte>(_segment.Base + _offset, _length);
        }
    }

    /// <summary>True while the lease may be used: not disposed and not passed on.</summary>
    public bool IsValid => Volatile.Read(ref _state) == Live;

    /// <summary>Disposed, or sent on in a message that was published: nobody here will own it again (unlike a lease still being sent).</summary>
    internal bool IsGone => Volatile.Read(ref _state) == Gone;

    internal ILeaseHost Host => _host;

    internal SharedMemorySegment Segment => _segment;

    internal long Offset => _offset;

    /// <summary>Where the arena block starts: the data offset, except for a pipelined payload whose block starts with its progress header.</summary>
    internal long BlockOffset { get; }

    /// <summary>The block can be sent on as it is (a pipelined block cannot: its data does not start at the block).</summary>
    internal bool CanMove => BlockOffset == _offset;

    /// <summary>The block belongs to the arena of the connection side that holds the lease (rented or returned), not to the peer.</summary>
    internal bool IsOwnArena { get; }

    /// <summary>Returns the block: to this side's arena, or to the peer that lent it.</summary>
    public void Dispose()
    {
        if (Interlocked.CompareExchange(ref _state, Gone, Live) == Live) // a lease being sent on stays the send's
        {
            try
            {
                _host.ReturnLease(this);
            }
            finally
            {
                _segment.Release();
            }
        }
    }

    /// <summary>Ends the lease without returning the block, because it is being sent on; false when it was already gone.</summary>
    internal bool TryDetach() => Interlocked.CompareExchange(ref _state, Detached, Live) == Live;

    /// <summary>The lease's bytes as memory of <typeparamref name="T"/> (whole elements only), valid while the lease is.</summary>
    internal Memory<T> CreateMemory<T>()
        where T : unmanaged
    {
        ThrowIfGone();
        if (typeof(T) == typeof(byte))
        {
            Memory<byte> bytes = Memory;
            return System.Runtime.CompilerServices.Unsafe.As<Memory<byte>, Memory<T>>(ref bytes);
        }

        int size = System.Runtime.CompilerServices.Unsafe.SizeOf<T>();
        if (_length % size != 0)
        {
            throw new ProtocolViolationException($"A payload of {_length} bytes is not a whole number of {typeof(T).Name} ({size} bytes each).");
        }

        return new Manager<T>(this).Memory;
    }

    /// <summary>Undoes <see cref="TryDetach"/> when the send that detached the lease failed.</summary>
    internal void Reattach() => Volatile.Write(ref _state, Live);

    /// <summary>Drops the mapping reference of a detached lease once the message carrying it is published.</summary>
    internal void ReleaseDetachedMapping()
    {
        Volatile.Write(ref _state, Gone);
        _segment.Release();
    }

    private void ThrowIfGone()
    {
        if (Volatile.Read(ref _state) != Live)
        {
            throw new ObjectDisposedException(nameof(SharedBuffer), "The lease was disposed or passed on to another process.");
        }
    }

    public override string ToString() => $"SharedBuffer({_length} bytes, segment {_segment.Id} +{_offset}{(IsValid ? string.Empty : ", gone")})";

    private sealed class Manager<T> : MemoryManager<T>
        where T : unmanaged
    {
        private readonly SharedBuffer _owner;

        public Manager(SharedBuffer owner) => _owner = owner;

        public override Span<T> GetSpan() => System.Runtime.InteropServices.MemoryMarshal.Cast<byte, T>(_owner.Span);

        /// <summary>
        /// Pins keep the mapping alive (not the lease): I/O on a pinned Memory cannot outlive the memory.
        /// The pin's reference is added while the live lease holds its own, so it succeeds even after
        /// the connection (the segment's owner) is gone; it fails only if a concurrent Dispose of the
        /// lease dropped the last reference first.
        /// </summary>
        public override MemoryHandle Pin(int elementIndex = 0)
        {
            _owner.ThrowIfGone();
            int size = System.Runtime.CompilerServices.Unsafe.SizeOf<T>();
            ArgumentOutOfRangeException.ThrowIfGreaterThan((uint)elementIndex, (uint)(_owner._length / size), nameof(elementIndex));
            ObjectDisposedException.ThrowIf(!_owner._segment.TryAddReference(), _owner);

            return new MemoryHandle(_owner._segment.Base + _owner._offset + ((long)elementIndex * size), default, this);
        }

        public override void Unpin() => _owner._segment.Release();

        protected override void Dispose(bool disposing)
        {
        }
    }
}

/// <summary>Where a lease goes back to when it is disposed.</summary>
internal interface ILeaseHost
{
    void ReturnLease(SharedBuffer lease);
}
