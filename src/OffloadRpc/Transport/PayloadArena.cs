using System.Diagnostics;
using System.Runtime.InteropServices;

namespace OffloadRpc.Transport;

/// <summary>The state of one arena block as its owner tracks it. Kept private to the owner: the peer never writes it.</summary>
internal enum BlockState : byte
{
    /// <summary>Held in this process: a lease, or a payload being written before it is sent.</summary>
    Local = 1,

    /// <summary>Sent to the peer, which releases it (or sends it back) when done.</summary>
    Lent = 2,

    /// <summary>Sent to the peer (pipelined) while this side still writes later chunks into it.</summary>
    LentWriting = 3,

    /// <summary>The peer released it while this side was still writing: freed when the writing ends.</summary>
    ReleasedWhileWriting = 4,
}

/// <summary>A block of the arena: where it lies and how large it is (rounded up to the block alignment).</summary>
internal readonly struct ArenaBlock
{
    public ArenaBlock(SharedMemorySegment segment, long offset, long capacity)
    {
        Segment = segment;
        Offset = offset;
        Capacity = capacity;
    }

    public SharedMemorySegment Segment { get; }

    public long Offset { get; }

    public long Capacity { get; }
}

/// <summary>
/// The payload arena of one direction of a connection, on the side that writes it: memfd segments
/// this process created and passed to the peer, carved into blocks with a first-fit free list per
/// segment and coalescing on free, so blocks can be returned in any order.
/// <para>
/// The arena grows by adding a segment (announced to the peer over the socket, acknowledged before
/// any message refers to it) up to <see cref="MaxBytes"/>, reuses freed space, and retires wholly
/// free segments only when it needs room for a larger one. When it is full the caller drains the
/// peer's release ring itself and waits on the release wake word, so progress never depends on
/// the receiver.
/// </para>
/// </summary>
internal sealed unsafe class PayloadArena
{
    public const int BlockAlignment = 64;
    public const int MaxSegments = 4095;
    private const int OffsetShift = 6;
    private const int SegmentShift = 40;

    private readonly object _lock = new();
    private readonly ArenaSegment?[] _segments = new ArenaSegment?[MaxSegments + 1];
    private readonly bool[] _reserved = new bool[MaxSegments + 1]; // ids of segments being created and announced outside the lock
    private readonly IArenaPeer _peer;
    private readonly string _name;
    private long _freeGeneration;
    private int _waiters;
    private int _nextSegmentId = 1;
    private long _totalBytes;
    private long _usedBytes;
    private bool _closed;

    public PayloadArena(IArenaPeer peer, long segmentSize, long maxBytes, TimeSpan waitTimeout, string name)
    {
        _peer = peer;
        SegmentSize = segmentSize;
        MaxBytes = maxBytes;
        WaitTimeout = waitTimeout;
        _name = name;
    }

    /// <summary>Moves whenever space is freed (under the lock); waiters compare it to know something changed.</summary>
    public long FreeGeneration => Volatile.Read(ref _freeGeneration);

    public long SegmentSize { get; }

    public long MaxBytes { get; }

    public TimeSpan WaitTimeout { get; }

    /// <summary>Bytes of all segments the arena holds now.</summary>
    public long TotalBytes => Volatile.Read(ref _totalBytes);

    /// <summary>Bytes of blocks in use (local or lent), rounded to the block alignment.</summary>
    public long UsedBytes => Volatile.Read(ref _usedBytes);

    public static ulong MakeHandle(int segmentId, long offset) => ((ulong)segmentId << SegmentShift) | ((ulong)offset >> OffsetShift);

    public static long RoundUp(long length) => (Math.Max(length, 1) + BlockAlignment - 1) & ~(long)(BlockAlignment - 1);

    /// <summary>
    /// Allocates a block of at least <paramref name="length"/> bytes, waiting for the peer to release
    /// space when full. The block comes with a reference on its segment's mapping that the caller owns.
    /// </summary>
    public ArenaBlock Allocate(long length, CancellationToken cancellationToken = default) => Allocate(length, mayWait: true, cancellationToken);

    /// <param name="mayWait">False: fail with <see cref="ArenaExhaustedException"/> at once rather than wait for space.</param>
    public ArenaBlock Allocate(long length, bool mayWait, CancellationToken cancellationToken)
    {
        long size = RoundUp(length);
        if (size > MaxBytes)
        {
            throw new ArenaExhaustedException($"A payload of {length} bytes can never fit: the {_name} arena may grow to {MaxBytes} bytes.");
        }

        long deadline = WaitTimeout == Timeout.InfiniteTimeSpan ? long.MaxValue : Stopwatch.GetTimestamp() + (long)(WaitTimeout.TotalSeconds * Stopwatch.Frequency);
        while (true)
        {
            long generation = FreeGeneration;
            if (TryAllocate(size, out ArenaBlock block))
            {
                return block;
            }

            // Full: wait until the peer posts a release or this process frees space, then try again.
            cancellationToken.ThrowIfCancellationRequested();
            if (!mayWait)
            {
                throw new ArenaExhaustedException(
                    $"The {_name} arena is full ({UsedBytes} of {MaxBytes} bytes held by leases or calls in flight) and this answer may not wait for space on the poller thread. Dispatch such methods to the thread pool (DispatchToThreadPool) to let them wait.");
            }

            Interlocked.Increment(ref _waiters);
            try
            {
                _peer.WaitForSpace(this, generation, deadline, cancellationToken);
            }
            finally
            {
                Interlocked.Decrement(ref _waiters);
            }

            _peer.ThrowIfClosed();
            cancellationToken.ThrowIfCancellationRequested();
            if (Stopwatch.GetTimestamp() > deadline)
            {
                throw new ArenaExhaustedException(
                    $"The {_name} arena stayed full for {WaitTimeout.TotalSeconds:0.#} s: {UsedBytes} of {MaxBytes} bytes are held by leases or by calls in flight and none was released. A payload of {length} bytes is waiting.");
            }
        }
    }

    /// <summary>
    /// Carves a block, or grows the arena by a segment. A new segment is created and announced to the
    /// peer outside the lock (the announcement waits for the peer to map it: a round trip through its
    /// socket that must not stall every other sender of this arena); its id and bytes are reserved meanwhile.
    /// </summary>
    private bool TryAllocate(long size, out ArenaBlock block)
    {
        int reservedId;
        long segmentSize;
        lock (_lock)
        {
            if (TryAllocateLocked(size, out block, out reservedId, out segmentSize))
            {
                return Referenced(block);
            }

            if (reservedId == 0)
            {
                return false;
            }
        }

        SharedMemorySegment memory;
        try
        {
            // Not pre-faulted: a connection commits only the pages its payloads touch, and reuse keeps them.
            memory = SharedMemorySegment.Create(reservedId, segmentSize, $"offloadrpc-{_name}-{reservedId}", populate: false);
        }
        catch
        {
            Unreserve(reservedId, segmentSize);
            throw;
        }

        try
        {
            _peer.AnnounceSegment(memory);
        }
        catch
        {
            memory.Dispose();
            Unreserve(reservedId, segmentSize);
            throw;
        }

        memory.CloseDescriptor(); // the peer has its own copy of the descriptor now; the mapping is all this side needs
        lock (_lock)
        {
            _reserved[reservedId] = false;
            if (_closed)
            {
                memory.Dispose();
                ThrowIfClosedLocked();
            }

            var segment = new ArenaSegment(memory);
            _segments[reservedId] = segment;
            bool carved = segment.TryCarve(size, out block);
            Debug.Assert(carved, "a fresh segment, unseen by other senders, holds the block it was made for");
            _usedBytes += size;
            Debug.Assert(_usedBytes <= _totalBytes, "more bytes in use than the segments hold");
            return Referenced(block);
        }
    }

    /// <summary>Under the lock, with the arena open: the arena still holds the owner's reference, so adding one cannot fail.</summary>
    private static bool Referenced(in ArenaBlock block)
    {
        bool referenced = block.Segment.TryAddReference();
        Debug.Assert(referenced, "an open arena's segment is mapped");
        return true;
    }

    private void Unreserve(int id, long size)
    {
        lock (_lock)
        {
            _reserved[id] = false;
            _totalBytes -= size;
        }
    }

    /// <summary>Carves a block (true), or reserves a segment id and its bytes for the caller to create (false, id set), or finds no room (false, id 0).</summary>
    private bool TryAllocateLocked(long size, out ArenaBlock block, out int reservedId, out long segmentSize)
    {
        ThrowIfClosedLocked();
        reservedId = 0;
        _peer.DrainReleases(this);
        // Rounded to 2 MiB, but never past the arena's limit: a block that fits the limit must be able to get a segment.
        segmentSize = Math.Min(Math.Max(SegmentSize, (size + (2 << 20) - 1) & ~((2L << 20) - 1)), MaxBytes);
        if (TryCarveLocked(size, out block))
        {
            return true;
        }

        Debug.Assert(segmentSize >= size, "Allocate refuses blocks larger than MaxBytes before it gets here.");
        if (_totalBytes + segmentSize > MaxBytes)
        {
            RetireFreeSegmentsLocked(_totalBytes + segmentSize - MaxBytes);
        }

        int id = 1;
        while (id < _nextSegmentId && (_segments[id] is not null || _reserved[id]))
        {
            id++;
        }

        if (_totalBytes + segmentSize > MaxBytes || id > MaxSegments)
        {
            return false;
        }

        _reserved[id] = true;
        _nextSegmentId = Math.Max(_nextSegmentId, id + 1);
        _totalBytes += segmentSize;
        reservedId = id;
        return false;
    }

    private bool TryCarveLocked(long size, out ArenaBlock block)
    {
        for (int i = 1; i < _nextSegmentId; i++)
        {
            ArenaSegment? segment = _segments[i];
            if (segment is not null && segment.TryCarve(size, out block))
            {
                _usedBytes += size;
                return true;
            }
        }

        block = default;
        return false;
    }

    private void RetireFreeSegmentsLocked(long needed)
    {
        for (int i = 1; i < _nextSegmentId && needed > 0; i++)
        {
            ArenaSegment? segment = _segments[i];
            if (segment is not null && segment.IsEmpty)
            {
                _segments[i] = null;
                _totalBytes -= segment.Memory.Size;
                needed -= segment.Memory.Size;
                _peer.RetireSegment(segment.Memory.Id);
                segment.Memory.Dispose(); // the arena's reference; no block is out, but a pin may still hold the mapping
            }
        }
    }

    /// <summary>Marks a local block as sent to the peer (before the message that carries it is published).</summary>
    public void MarkLent(int segmentId, long offset, bool stillWriting = false) =>
        Transition(segmentId, offset, BlockState.Local, stillWriting ? BlockState.LentWriting : BlockState.Lent, out _);

    /// <summary>
    /// The last chunk of a pipelined block is written: it becomes an ordinary lent block, or is freed
    /// if the peer already released it (a release never frees a block this side still writes into).
    /// </summary>
    public void FinishWriting(int segmentId, long offset)
    {
        lock (_lock)
        {
            if (_closed)
            {
                return;
            }

            ArenaSegment segment = _segments[segmentId] ?? throw new InvalidOperationException($"Segment {segmentId} is not in the {_name} arena.");
            if (segment.TryTransition(offset, BlockState.LentWriting, BlockState.Lent, out _))
            {
                return;
            }

            long size = segment.Free(offset, BlockState.ReleasedWhileWriting) ?? throw new InvalidOperationException($"Block {segmentId}:{offset} of the {_name} arena was not being written.");
            _usedBytes -= size;
            _freeGeneration++;
        }

        if (Volatile.Read(ref _waiters) != 0)
        {
            _peer.WakeSpaceWaiters();
        }
    }

    /// <summary>Frees a block this process holds (a lease disposed, or a send that failed before publishing).</summary>
    public void FreeLocal(int segmentId, long offset, BlockState expected = BlockState.Local)
    {
        lock (_lock)
        {
            if (_closed)
            {
                return;
            }

            ArenaSegment segment = _segments[segmentId] ?? throw new InvalidOperationException($"Segment {segmentId} is not in the {_name} arena.");
            long size = segment.Free(offset, expected) ?? throw new InvalidOperationException($"No {expected} block at {segmentId}:{offset} in the {_name} arena.");
            _usedBytes -= size;
            Debug.Assert(_usedBytes >= 0, "more bytes freed than allocated");
            _freeGeneration++;
        }

        if (Volatile.Read(ref _waiters) != 0)
        {
            _peer.WakeSpaceWaiters();
        }
    }

    /// <summary>The peer released a block it had been lent. Called with releases drained from the peer's release ring.</summary>
    /// <exception cref="ProtocolViolationException">The handle names no block lent to the peer.</exception>
    public void ReleaseFromPeerLocked(ulong handle)
    {
        Debug.Assert(Monitor.IsEntered(_lock), "releases are drained under the arena lock");
        int segmentId = (int)(handle >> SegmentShift);
        long offset = (long)(handle & ((1UL << SegmentShift) - 1)) << OffsetShift;
        ArenaSegment? segment = segmentId is > 0 and <= MaxSegments ? _segments[segmentId] : null;
        if (segment is not null && segment.TryTransition(offset, BlockState.LentWriting, BlockState.ReleasedWhileWriting, out _))
        {
            return; // still being written: freed by FinishWriting
        }

        long? size = segment?.Free(offset, BlockState.Lent);
        if (size is null)
        {
            throw new ProtocolViolationException($"The peer released block {segmentId}:{offset}, which was not lent to it.");
        }

        _usedBytes -= size.Value;
        _freeGeneration++;
    }

    /// <summary>Runs <paramref name="drain"/> under the arena lock (the receiver's share of release draining).</summary>
    public void DrainUnderLock(Action<PayloadArena> drain)
    {
        long before;
        lock (_lock)
        {
            if (_closed)
            {
                return;
            }

            before = _freeGeneration;
            drain(this);
        }

        // The receiver drained what a waiting allocator was waiting for: tell it.
        if (FreeGeneration != before && Volatile.Read(ref _waiters) != 0)
        {
            _peer.WakeSpaceWaiters();
        }
    }

    /// <summary>The peer sent back a block it had been lent (a lease moved onward): it becomes local again.</summary>
    /// <exception cref="ProtocolViolationException">No block lent to the peer starts there, or the length exceeds it.</exception>
    public ArenaBlock ReturnFromPeer(int segmentId, long offset, long length)
    {
        lock (_lock)
        {
            ThrowIfClosedLocked();
            ArenaSegment? segment = segmentId is > 0 and <= MaxSegments ? _segments[segmentId] : null;
            if (segment is null || !segment.TryTransition(offset, BlockState.Lent, BlockState.Local, out long capacity) || length > capacity || length < 0)
            {
                throw new ProtocolViolationException($"The peer sent back block {segmentId}:{offset} (+{length}), which was not lent to it.");
            }

            // For the receiver of the message; under the lock with the arena open, so the arena's own reference is still held.
            bool referenced = segment.Memory.TryAddReference();
            Debug.Assert(referenced, "an open arena's segment is mapped");
            return new ArenaBlock(segment.Memory, offset, capacity);
        }
    }

    private void Transition(int segmentId, long offset, BlockState from, BlockState to, out long capacity)
    {
        lock (_lock)
        {
            ThrowIfClosedLocked();
            ArenaSegment segment = _segments[segmentId] ?? throw new InvalidOperationException($"Segment {segmentId} is not in the {_name} arena.");
            if (!segment.TryTransition(offset, from, to, out capacity))
            {
                throw new InvalidOperationException($"Block {segmentId}:{offset} of the {_name} arena is not {from}.");
            }
        }
    }

    private void ThrowIfClosedLocked()
    {
        if (_closed)
        {
            _peer.ThrowIfClosed();
            throw new ObjectDisposedException(nameof(PayloadArena));
        }
    }

    /// <summary>Drops the arena's own (owner's) references to its segments; leases still alive keep their mapping.</summary>
    public void Close()
    {
        lock (_lock)
        {
            if (_closed)
            {
                return;
            }

            _closed = true;
            for (int i = 1; i < _nextSegmentId; i++)
            {
                _segments[i]?.Memory.Dispose();
                _segments[i] = null;
            }

            _totalBytes = 0;
            _usedBytes = 0;
        }
    }

    /// <summary>One segment's blocks and free ranges. Used under the arena lock only.</summary>
    private sealed class ArenaSegment
    {
        private readonly SortedList<long, long> _free = new();
        private readonly Dictionary<long, Block> _blocks = new();

        public ArenaSegment(SharedMemorySegment memory)
        {
            Memory = memory;
            _free.Add(0, memory.Size);
        }

        public SharedMemorySegment Memory { get; }

        public bool IsEmpty => _blocks.Count == 0;

        public bool TryCarve(long size, out ArenaBlock block)
        {
            IList<long> offsets = _free.Keys;
            IList<long> lengths = _free.Values;
            for (int i = 0; i < offsets.Count; i++)
            {
                long length = lengths[i];
                if (length < size)
                {
                    continue;
                }

                long offset = offsets[i];
                _free.RemoveAt(i);
                if (length > size)
                {
                    _free.Add(offset + size, length - size);
                }

                _blocks.Add(offset, new Block(size, BlockState.Local));
                block = new ArenaBlock(Memory, offset, size);
                return true;
            }

            block = default;
            return false;
        }

        public bool TryTransition(long offset, BlockState from, BlockState to, out long capacity)
        {
            ref Block block = ref CollectionsMarshal.GetValueRefOrNullRef(_blocks, offset);
            if (System.Runtime.CompilerServices.Unsafe.IsNullRef(ref block) || block.State != from)
            {
                capacity = 0;
                return false;
            }

            block.State = to;
            capacity = block.Size;
            return true;
        }

        /// <summary>Frees the block at <paramref name="offset"/> if it is in state <paramref name="expected"/>; returns its size.</summary>
        public long? Free(long offset, BlockState expected)
        {
            if (!_blocks.TryGetValue(offset, out Block block) || block.State != expected)
            {
                return null;
            }

            _blocks.Remove(offset);
            InsertFree(offset, block.Size);
            return block.Size;
        }

        private void InsertFree(long offset, long size)
        {
            IList<long> offsets = _free.Keys;
            int lo = 0;
            int hi = offsets.Count - 1;
            while (lo <= hi)
            {
                int mid = (lo + hi) >>> 1;
                if (offsets[mid] < offset)
                {
                    lo = mid + 1;
                }
                else
                {
                    hi = mid - 1;
                }
            }

            // lo is the index of the first free range after the block.
            if (lo < offsets.Count && offset + size == offsets[lo])
            {
                size += _free.Values[lo];
                _free.RemoveAt(lo);
            }

            if (lo > 0)
            {
                long previous = offsets[lo - 1];
                long previousSize = _free.Values[lo - 1];
                if (previous + previousSize == offset)
                {
                    _free[previous] = previousSize + size;
                    return;
                }
            }

            _free.Add(offset, size);
        }

        private struct Block
        {
            public Block(long size, BlockState state)
            {
                Size = size;
                State = state;
            }

            public long Size;
            public BlockState State;
        }
    }
}

/// <summary>What an arena needs from its connection: the socket for segment announcements and the peer's release ring.</summary>
internal interface IArenaPeer
{
    bool IsClosed { get; }

    void ThrowIfClosed();

    /// <summary>Waits (bounded by close, cancellation and <paramref name="deadline"/>) until space may have been freed since <paramref name="freeGeneration"/>.</summary>
    void WaitForSpace(PayloadArena arena, long freeGeneration, long deadline, CancellationToken cancellationToken);

    /// <summary>Wakes threads of this process waiting in <see cref="WaitForSpace"/>.</summary>
    void WakeSpaceWaiters();

    /// <summary>Passes the segment's memfd to the peer and returns once the peer has mapped it.</summary>
    void AnnounceSegment(SharedMemorySegment segment);

    /// <summary>Tells the peer to unmap a segment that has no blocks left.</summary>
    void RetireSegment(int segmentId);

    /// <summary>Consumes the peer's release ring, calling <see cref="PayloadArena.ReleaseFromPeerLocked"/> per entry. Called under the arena lock.</summary>
    void DrainReleases(PayloadArena arena);
}
