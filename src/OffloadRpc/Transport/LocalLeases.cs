using System.Collections.Concurrent;
using System.Numerics;

namespace OffloadRpc.Transport;

/// <summary>
/// Leases on memory no other process maps: what a <see cref="SharedBuffer"/> is on a transport without
/// shared memory (gRPC). Each lease owns a memfd mapping of its own (a power of two of pages), so a
/// lease behaves exactly as one from an arena (Span, Memory, pins, Dispose), while its bytes are copied
/// into and out of messages by the transport. Mappings given back are kept for the next lease of their
/// size (a few per size, <see cref="MaxKeptBytes"/> in all): a call over gRPC then costs no
/// memfd_create, mmap, page faults and munmap per buffer.
/// </summary>
internal sealed unsafe class LocalLeases : ILeaseHost
{
    public static readonly LocalLeases Instance = new();

    /// <summary>The most bytes of mappings kept for reuse, all sizes together.</summary>
    public const long MaxKeptBytes = 64L << 20;

    private const int PageShift = 12;
    private const int KeptPerSize = 4;

    /// <summary>Sizes kept: 4 KiB (class 0) to 32 MiB (class 13).</summary>
    private const int Classes = 14;

    private readonly ConcurrentQueue<SharedMemorySegment>[] _kept = new ConcurrentQueue<SharedMemorySegment>[Classes];
    private long _keptBytes;
    private int _nextId;

    /// <summary>
    /// The most mappings (leases, arenas and peers' segments together) this process holds before a new
    /// local lease is refused: a quarter of the kernel's vm.max_map_count (65,530 by default), leaving the
    /// rest to the runtime, the GC and native code.
    /// </summary>
    internal static long MaxLiveMappings { get; set; } = ReadMaxMapCount() / 4;

    private static long ReadMaxMapCount()
    {
        try
        {
            return long.TryParse(File.ReadAllText("/proc/sys/vm/max_map_count").Trim(), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out long count) && count > 0 ? count : 65_530;
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            return 65_530; // the kernel's default
        }
    }

    private LocalLeases()
    {
        for (int i = 0; i < Classes; i++)
        {
            _kept[i] = new ConcurrentQueue<SharedMemorySegment>();
        }
    }

    private long _outstanding;

    /// <summary>Leases rented here and not given back yet, in this process (the fuzzer's leak check).</summary>
    internal long OutstandingLeases => Interlocked.Read(ref _outstanding);

    /// <summary>The bytes of the mapping a lease of <paramref name="bytes"/> bytes holds: a power of two of pages up to 32 MiB, whole pages above.</summary>
    public static long MappingSize(int bytes) => SizeOf(bytes).Size;

    private static (int SizeClass, long Size) SizeOf(int bytes)
    {
        long pages = Math.Max(1, (bytes + 4095L) >> PageShift);
        int sizeClass = 63 - BitOperations.LeadingZeroCount((ulong)(pages - 1)) + 1; // ceil(log2(pages))
        return (sizeClass, sizeClass < Classes ? 1L << (sizeClass + PageShift) : pages << PageShift);
    }

    /// <summary>A lease of exactly <paramref name="bytes"/> bytes (zero allowed), zero-filled.</summary>
    public SharedBuffer Rent(int bytes) => Rent(bytes, clear: true);

    /// <summary>A lease of exactly <paramref name="bytes"/> bytes; without <paramref name="clear"/> its bytes are whatever a previous lease left (for a receiver that fills all of them).</summary>
    public SharedBuffer Rent(int bytes, bool clear) => Rent(bytes, clear, this);

    /// <summary><see cref="Rent(int, bool)"/>, given back through <paramref name="host"/> (a <see cref="LeaseBudget"/>, which then gives it back here).</summary>
    internal SharedBuffer Rent(int bytes, bool clear, ILeaseHost host)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        (int sizeClass, long size) = SizeOf(bytes);
        SharedMemorySegment? segment = null;
        if (sizeClass < Classes && _kept[sizeClass].TryDequeue(out SharedMemorySegment? kept))
        {
            Interlocked.Add(ref _keptBytes, -kept.Size);
            if (kept.TryAddReference())
            {
                segment = kept;
                if (clear)
                {
                    new Span<byte>(segment.Pointer(0, bytes), bytes).Clear();
                }
            }
            else
            {
                kept.Dispose();
            }
        }

        if (segment is null)
        {
            if (SharedMemorySegment.LiveSegments >= MaxLiveMappings)
            {
                // Each lease is a mapping of its own, and the kernel allows a process only so many
                // (vm.max_map_count): past it even the runtime cannot map code and the process dies. A
                // peer that declares buffers faster than calls give them back meets this instead.
                throw new ArenaExhaustedException(
                    $"This process holds {SharedMemorySegment.LiveSegments:N0} memory mappings, the most it takes for buffers ({MaxLiveMappings:N0}, a quarter of vm.max_map_count): a buffer of {bytes:N0} bytes has no room until others are given back.");
            }

            segment = SharedMemorySegment.Create(Interlocked.Increment(ref _nextId), size, "offloadrpc-local", populate: false);
            segment.CloseDescriptor(); // never passed to anybody
            if (!segment.TryAddReference())
            {
                segment.Dispose();
                throw new ObjectDisposedException(nameof(SharedMemorySegment));
            }
        }

        var lease = new SharedBuffer(host, segment, 0, bytes, ownedBySender: true);
        Interlocked.Increment(ref _outstanding);
        return lease;
    }

    /// <summary>
    /// The lease's mapping is kept for another lease of its size while there is room, else it goes (the
    /// lease then drops the reference it held; the last one unmaps).
    /// </summary>
    public void ReturnLease(SharedBuffer lease)
    {
        Interlocked.Decrement(ref _outstanding);
        SharedMemorySegment segment = lease.Segment;
        long pages = segment.Size >> PageShift;
        int sizeClass = BitOperations.Log2((ulong)pages);
        if (BitOperations.IsPow2(pages) && sizeClass < Classes && _kept[sizeClass].Count < KeptPerSize)
        {
            if (Interlocked.Add(ref _keptBytes, segment.Size) <= MaxKeptBytes)
            {
                _kept[sizeClass].Enqueue(segment);
                return;
            }

            Interlocked.Add(ref _keptBytes, -segment.Size);
        }

        segment.Dispose();
    }
}

/// <summary>
/// A bound on the bytes a gRPC server holds for the requests in flight, which gRPC delivers into this
/// process's own memory (over shared memory they stay in the peer's segments, bounded by
/// <see cref="OffloadRpcOptions.MaxPeerMappedBytes"/>): the leases of their buffers, counted as their bytes
/// arrive (<see cref="RentArriving"/>) and at their mapping's size once whole or when rented whole
/// (<see cref="Rent(int)"/>), until disposed, whoever holds them by then (a method that keeps a
/// buffer argument keeps it counted), and the large request frames kept while their calls run
/// (<see cref="Reserve"/>). The bytes held never pass the limit. With <paramref name="forReplies"/>, the
/// same bound on a gRPC client's replies and streamed results (<see cref="OffloadRpcOptions.MaxBufferedReplyBytes"/>).
/// </summary>
internal sealed class LeaseBudget(long limit, bool forReplies = false) : ILeaseHost
{
    private long _held;

    /// <summary>
    /// Whether a large head frame counts too: a server's request heads do (a peer may make them as large as
    /// it likes and the server keeps them while their calls run); a client's reply heads do not, each bounded
    /// by OffloadRpcOptions.MaxMessageBytes and gone once decoded, on every call path alike.
    /// </summary>
    public bool CountsHeads => !forReplies;

    public long Limit => limit;

    /// <summary>The bytes reserved through this budget and not given back.</summary>
    public long HeldBytes => Interlocked.Read(ref _held);

    /// <summary>Takes <paramref name="bytes"/> of the budget, or throws <see cref="ArenaExhaustedException"/> (taking nothing) when they would take it past the limit.</summary>
    public void Reserve(long bytes, string what)
    {
        long held = Interlocked.Read(ref _held);
        while (true)
        {
            if (bytes > limit - held)
            {
                throw new ArenaExhaustedException(forReplies
                    ? $"The gRPC replies in flight hold {held:N0} bytes of this client's memory, its budget is {limit:N0} (OffloadRpcOptions.MaxBufferedReplyBytes): {what} of {bytes:N0} bytes has no room until results held are disposed."
                    : $"The gRPC requests in flight hold {held:N0} bytes of this server's memory, its budget is {limit:N0} (OffloadRpcOptions.MaxBufferedRequestBytes): {what} of {bytes:N0} bytes has no room until calls in flight end.");
            }

            long seen = Interlocked.CompareExchange(ref _held, held + bytes, held);
            if (seen == held)
            {
                return;
            }

            held = seen;
        }
    }

    /// <summary>Gives back bytes taken by <see cref="Reserve"/>.</summary>
    public void Release(long bytes) => Interlocked.Add(ref _held, -bytes);

    /// <summary>A lease of <paramref name="bytes"/> bytes (not cleared: the receiver fills all of them), its whole mapping counted, or <see cref="ArenaExhaustedException"/> when that would pass the limit.</summary>
    public SharedBuffer Rent(int bytes)
    {
        long size = LocalLeases.MappingSize(bytes);
        Reserve(size, "a buffer");
        try
        {
            SharedBuffer lease = LocalLeases.Instance.Rent(bytes, clear: false, this);
            System.Diagnostics.Debug.Assert(lease.Segment.Size == size, "the mapping is the size reserved");
            return lease;
        }
        catch
        {
            Release(size);
            throw;
        }
    }

    /// <summary><paramref name="budget"/>'s lease of <paramref name="bytes"/> bytes, or without a budget an uncounted local one (neither cleared).</summary>
    public static SharedBuffer Rent(LeaseBudget? budget, int bytes) =>
        budget is not null ? budget.Rent(bytes) : LocalLeases.Instance.Rent(bytes, clear: false);

    /// <summary>
    /// A lease of <paramref name="bytes"/> bytes (not cleared) for bytes that arrive from a peer, counted as
    /// they arrive (<see cref="ArrivalCharge.Cover"/>), not at its mapping from the start: the size a peer
    /// names costs nothing of itself, so a few bytes that name large buffers cannot take the budget from every
    /// other caller. Made with nothing counted; the lease gives back what was counted when disposed.
    /// </summary>
    public SharedBuffer RentArriving(int bytes, out ArrivalCharge charge)
    {
        charge = new ArrivalCharge(this, LocalLeases.MappingSize(bytes), bytes);
        return LocalLeases.Instance.Rent(bytes, clear: false, charge);
    }

    void ILeaseHost.ReturnLease(SharedBuffer lease)
    {
        Release(lease.Segment.Size);
        LocalLeases.Instance.ReturnLease(lease);
    }
}

/// <summary>
/// What a lease made by <see cref="LeaseBudget.RentArriving"/> counts: the bytes that have arrived, in
/// steps of <see cref="Step"/> (one reservation per step, not per frame), and its whole mapping once all of
/// them are in, as a lease rented whole counts; given back when the lease is disposed. Grown by the one
/// receiver that fills the lease, before the bytes are copied; given back by whoever disposes it.
/// </summary>
internal sealed class ArrivalCharge(LeaseBudget budget, long mapping, long length) : ILeaseHost
{
    /// <summary>The steps the count grows by while the bytes arrive: a gRPC data frame's most bytes.</summary>
    public const long Step = 1 << 20;

    private long _counted;

    /// <summary>The bytes of the budget this lease holds now.</summary>
    public long Counted => Volatile.Read(ref _counted);

    /// <summary>
    /// Counts the lease's bytes up to <paramref name="end"/> (its whole mapping when that is all of them), or
    /// throws <see cref="ArenaExhaustedException"/> taking nothing more when that would pass the budget.
    /// </summary>
    public void Cover(long end)
    {
        long target = end >= length ? mapping : Math.Min(mapping, (end + Step - 1) / Step * Step);
        long counted = Volatile.Read(ref _counted);
        if (target > counted)
        {
            budget.Reserve(target - counted, $"a buffer of {length:N0} bytes, counted as its bytes arrive ({counted:N0} so far), the next step");
            Volatile.Write(ref _counted, target);
        }
    }

    void ILeaseHost.ReturnLease(SharedBuffer lease)
    {
        budget.Release(Interlocked.Exchange(ref _counted, 0));
        LocalLeases.Instance.ReturnLease(lease);
    }
}
