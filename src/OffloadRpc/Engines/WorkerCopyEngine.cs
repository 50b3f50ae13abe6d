using OffloadRpc.Transport;

namespace OffloadRpc.Engines;

/// <summary>
/// Software offload: dedicated copy threads fed by a lock-free bounded queue of descriptors. Large
/// copies are cut into chunks so that every worker can take part. An idle worker spins for a bounded
/// time after its last chunk (when <see cref="SpinGate"/> gives it a place: steady traffic then costs
/// no wake-up per call) and then parks on a futex word, so an idle engine costs no CPU. A submitter
/// that will wait for its copy anyway runs queued chunks itself while the workers are still waking up
/// (<see cref="HelpUntil"/>).
/// </summary>
internal sealed class WorkerCopyEngine : ICopyEngine, IDisposable
{
    /// <summary>Copies are cut into pieces of this size so several workers share one large copy.</summary>
    public const ulong ChunkBytes = 1 << 20;

    private const int ParkSliceMilliseconds = 100;

    /// <summary>The workers' futex word, on a pinned cache line of its own.</summary>
    private readonly int[] _park = GC.AllocateArray<int>(16, pinned: true);
    private readonly AdaptiveSpin _noAdaptation = new(TimeSpan.Zero);

    private static readonly Lazy<WorkerCopyEngine> s_shared = new(() => new WorkerCopyEngine(DefaultThreads));

    private readonly WorkQueue _queue = new(4096);
    private readonly Thread[] _threads;
    private readonly long _spinTicks;
    private int _sleepers;
    private volatile bool _stopping;

    public WorkerCopyEngine(int threads, TimeSpan? spinBeforePark = null)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(threads, 1);
        _spinTicks = (long)((spinBeforePark ?? TimeSpan.FromMicroseconds(50)).TotalSeconds * System.Diagnostics.Stopwatch.Frequency);
        _threads = new Thread[threads];
        for (int i = 0; i < threads; i++)
        {
            _threads[i] = new Thread(Run) { IsBackground = true, Name = $"OffloadRpc copy worker {i}" };
            _threads[i].UnsafeStart();
        }
    }

    /// <summary>The process-wide engine (one thread per core but one, at most four), started on first use.</summary>
    public static WorkerCopyEngine Shared => s_shared.Value;

    public string Name => "worker";

    public int ThreadCount => _threads.Length;

    /// <summary>True when every worker is parked (none spinning or copying): a chunk submitted now waits for a futex wake-up.</summary>
    public bool AllParked => Volatile.Read(ref _sleepers) == _threads.Length;

    /// <summary>
    /// Waits for <paramref name="completion"/>, first running queued chunks on this thread when
    /// <paramref name="help"/> (the workers were parked when the copy was submitted: rather than wait the
    /// ~40-150 us their wake-up takes on a VM, the caller copies; a worker that wakes takes what is left).
    /// </summary>
    public void HelpUntil(CopyCompletion completion, bool help)
    {
        while (help && !completion.IsCompleted && _queue.TryDequeue(out WorkItem item))
        {
            Execute(item);
        }

        completion.Wait();
    }

    public string Description => Describe(_threads.Length, "");

    /// <summary>The shared engine's default thread count (one per core but one, at most four).</summary>
    internal static int DefaultThreads => Math.Clamp(Environment.ProcessorCount - 1, 1, 4);

    internal static string Describe(int threads, string when) => $"{threads} dedicated copy thread(s){when}, chunks of {ChunkBytes >> 20} MiB";

    public void Submit(ReadOnlySpan<CopyDescriptor> batch, CopyCompletion completion)
    {
        ObjectDisposedException.ThrowIf(_stopping, this);

        // Everything the batch will complete is expected before any of it runs: completing an inline
        // move first would otherwise let the completion fire while the chunks are still queued.
        int inline = 0;
        int chunks = 0;
        foreach (CopyDescriptor descriptor in batch)
        {
            if (Overlaps(descriptor))
            {
                inline++;
            }
            else
            {
                chunks += (int)Math.Max(1, (descriptor.Length + ChunkBytes - 1) / ChunkBytes);
            }
        }

        if (inline + chunks == 0)
        {
            return;
        }

        completion.Expect(inline + chunks);
        foreach (CopyDescriptor descriptor in batch)
        {
            if (Overlaps(descriptor))
            {
                // Chunks run in any order on any worker: an overlapping move is done whole, here, as memmove.
                CpuCopyEngine.Execute(descriptor);
                completion.Complete();
            }
        }

        if (chunks == 0)
        {
            return;
        }

        foreach (CopyDescriptor descriptor in batch)
        {
            if (Overlaps(descriptor))
            {
                continue;
            }

            ulong offset = 0;
            do
            {
                ulong length = Math.Min(ChunkBytes, descriptor.Length - offset);
                CopyDescriptor chunk = descriptor;
                chunk.Source += (nint)offset;
                chunk.Destination += (nint)offset;
                chunk.Length = length;
                Enqueue(new WorkItem(chunk, completion));
                offset += length;
            }
            while (offset < descriptor.Length);
        }
    }

    private static unsafe bool Overlaps(in CopyDescriptor descriptor) =>
        CopyRoutines.Overlap((byte*)descriptor.Source, (byte*)descriptor.Destination, (nuint)descriptor.Length);

    private void Enqueue(in WorkItem item)
    {
        var spinner = new SpinWait();
        while (!_queue.TryEnqueue(item))
        {
            // Queue full: the workers are behind; help them rather than wait.
            if (_queue.TryDequeue(out WorkItem other))
            {
                Execute(other);
            }
            else
            {
                spinner.SpinOnce(sleep1Threshold: -1);
            }
        }

        // Full fence between publishing the item and reading the park word (a worker arms the word,
        // then re-checks the queue): without it the two could miss each other (store-load reordering)
        // and the item would wait for a worker that sleeps.
        Interlocked.MemoryBarrier();
        WakeWorkers();
    }

    private unsafe void WakeWorkers()
    {
        fixed (int* word = _park)
        {
            SharedWait.Wake(word);
        }
    }

    private unsafe void Run()
    {
        var hasWork = new HasWork(this);
        while (!_stopping)
        {
            if (_queue.TryDequeue(out WorkItem item))
            {
                Execute(item);
                continue;
            }

            if (SharedWait.Spin(ref hasWork, _spinTicks) != SharedWait.SpinOutcome.BudgetSpent)
            {
                continue;
            }

            Interlocked.Increment(ref _sleepers);
            fixed (int* word = _park)
            {
                var parked = new SharedWait.FlagArmed<HasWork>(hasWork, word, singleWaiter: false);
                SharedWait.Sleep(ref parked, _noAdaptation, ParkSliceMilliseconds);
            }

            Interlocked.Decrement(ref _sleepers);
        }
    }

    private readonly struct HasWork(WorkerCopyEngine engine) : IWaitCondition
    {
        public bool IsSatisfied() => engine._queue.HasItems;

        public bool IsAbandoned() => engine._stopping;
    }

    private static void Execute(in WorkItem item)
    {
        CpuCopyEngine.Execute(item.Descriptor);
        item.Completion.Complete();
    }

    public void Dispose()
    {
        _stopping = true;
        WakeWorkers();
        foreach (Thread thread in _threads)
        {
            thread.Join();
        }
    }

    private readonly record struct WorkItem(CopyDescriptor Descriptor, CopyCompletion Completion);

    /// <summary>A bounded multi-producer, multi-consumer queue (Vyukov), in managed memory.</summary>
    private sealed class WorkQueue
    {
        private readonly Cell[] _cells;
        private readonly long _mask;
        private long _enqueuePosition;
        private long _dequeuePosition;

        public WorkQueue(int capacity)
        {
            _cells = new Cell[capacity];
            _mask = capacity - 1;
            for (int i = 0; i < capacity; i++)
            {
                _cells[i].Sequence = i;
            }
        }

        public bool HasItems => Volatile.Read(ref _cells[Volatile.Read(ref _dequeuePosition) & _mask].Sequence) == Volatile.Read(ref _dequeuePosition) + 1;

        public bool TryEnqueue(in WorkItem item)
        {
            long position = Volatile.Read(ref _enqueuePosition);
            while (true)
            {
                ref Cell cell = ref _cells[position & _mask];
                long diff = Volatile.Read(ref cell.Sequence) - position;
                if (diff == 0)
                {
                    long seen = Interlocked.CompareExchange(ref _enqueuePosition, position + 1, position);
                    if (seen == position)
                    {
                        cell.Item = item;
                        Volatile.Write(ref cell.Sequence, position + 1);
                        return true;
                    }

                    position = seen;
                }
                else if (diff < 0)
                {
                    return false;
                }
                else
                {
                    position = Volatile.Read(ref _enqueuePosition);
                }
            }
        }

        public bool TryDequeue(out WorkItem item)
        {
            long position = Volatile.Read(ref _dequeuePosition);
            while (true)
            {
                ref Cell cell = ref _cells[position & _mask];
                long diff = Volatile.Read(ref cell.Sequence) - (position + 1);
                if (diff == 0)
                {
                    long seen = Interlocked.CompareExchange(ref _dequeuePosition, position + 1, position);
                    if (seen == position)
                    {
                        item = cell.Item;
                        cell.Item = default;
                        Volatile.Write(ref cell.Sequence, position + _mask + 1);
                        return true;
                    }

                    position = seen;
                }
                else if (diff < 0)
                {
                    item = default;
                    return false;
                }
                else
                {
                    position = Volatile.Read(ref _dequeuePosition);
                }
            }
        }

        private struct Cell
        {
            public long Sequence;
            public WorkItem Item;
        }
    }
}

/// <summary>The engines of this machine, each with what it runs on. Every engine listed can run.</summary>
internal static class EngineCatalog
{
    /// <remarks>The worker engine is described without starting the shared one (its threads start on first use).</remarks>
    public static IReadOnlyList<(string Name, string Description)> Describe() =>
    [
        (CpuCopyEngine.Instance.Name, CpuCopyEngine.Instance.Description),
        ("worker", WorkerCopyEngine.Describe(WorkerCopyEngine.DefaultThreads, " on demand")),
    ];
}
