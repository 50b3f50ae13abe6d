using System.Diagnostics;
using System.Runtime.InteropServices;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>What <see cref="PollSource.Poll"/> did.</summary>
internal enum PollResult
{
    /// <summary>Nothing was ready.</summary>
    Idle,

    /// <summary>It did some work (the poller polls again at once).</summary>
    Worked,

    /// <summary>It is done: the poller drops it and calls <see cref="PollSource.OnRemoved"/>.</summary>
    Finished,
}

/// <summary>
/// Something a <see cref="Poller"/> watches: a futex word in (shared) memory that wakers wake after
/// making work available, a cheap poll that does the work, and a wish to be spun for.
/// </summary>
internal abstract unsafe class PollSource
{
    private int _removeRequested;

    /// <summary>The poller it is registered with (set by <see cref="Poller.Add"/>).</summary>
    internal Poller? Owner { get; set; }

    internal bool RemoveRequested => Volatile.Read(ref _removeRequested) != 0;

    /// <summary>Asks the poller to drop this source (any thread); <see cref="OnRemoved"/> follows on the poller's thread.</summary>
    public void RequestRemoval()
    {
        Volatile.Write(ref _removeRequested, 1);
        Owner?.Ring();
    }

    /// <summary>Makes a recycled source registrable again.</summary>
    protected void ResetRemoval() => Volatile.Write(ref _removeRequested, 0);

    /// <summary>Poller thread: does the work that is ready, a bounded amount of it (other sources wait meanwhile).</summary>
    public abstract PollResult Poll(long now);

    /// <summary>
    /// Poller thread, before it sleeps: publishes "the poller sleeps" where wakers look (with a full
    /// fence) and names the futex word and the value to sleep on. The poller polls once more after
    /// arming every source, so a waker that came before the arm is seen then.
    /// </summary>
    public abstract void Arm(out int* word, out int expected);

    /// <summary>Poller thread, after a sleep: takes back the arm so wakers skip the wake syscall while the poller is awake.</summary>
    public virtual void Disarm()
    {
    }

    /// <summary>Until when (a <see cref="Stopwatch"/> timestamp) the poller should keep spinning for this source; 0: not at all.</summary>
    public virtual long SpinUntil(long now) => 0;

    /// <summary>Poller thread: this source's word woke the poller after it slept <paramref name="sleptTicks"/>.</summary>
    public virtual void OnWoken(long sleptTicks)
    {
    }

    /// <summary>Whether this source's peer is calling actively now and competes for a spin grant (a server's connection).</summary>
    public virtual bool CompetesForSpin(long now) => false;

    /// <summary>
    /// Whether work this source started runs on other threads of this process now (a served call's stream
    /// producer): a spinning poller then offers its core, which that work needs, even while it serves.
    /// </summary>
    public virtual bool HasWorkElsewhere => false;

    /// <summary>Tells the peer whether it may spin waiting for our replies (see <see cref="Poller"/>).</summary>
    public virtual void GrantSpin(bool granted)
    {
    }

    /// <summary>The longest the poller may sleep without polling this source again (ms; -1: until woken).</summary>
    public virtual int SleepSliceMilliseconds => -1;

    /// <summary>Poller thread: the source has left the poller; its word will not be touched again.</summary>
    public abstract void OnRemoved();
}

/// <summary>
/// One thread that watches many sources (connections' inbound rings, asynchronous waits): it polls
/// them all, spins while some source expects work within its budget (and <see cref="SpinGate"/> gives it
/// a place), and otherwise sleeps on all their futex words at once with futex_waitv. A server with a
/// hundred clients so holds one thread, not one per connection, and an idle one sleeps.
/// <para>
/// Spinning clients on a small machine take the cores the server needs: with more spinners than cores
/// every hand-off waits for a time slice. So the poller lets only as many actively calling clients spin
/// for their replies as there are cores, and rotates that grant among them every millisecond; the others
/// sleep until their reply wakes them. One client alone is always granted.
/// </para>
/// </summary>
internal sealed unsafe partial class Poller
{
    /// <summary>One futex_waitv call takes 128 words; one is the poller's own doorbell.</summary>
    public const int MaxSources = LinuxNative.FutexWaitvMax - 1;

    private readonly Thread _thread;
    private readonly object _gate = new();
    private readonly List<PollSource> _added = new();
    private readonly int* _doorbell;
    private readonly LinuxNative.FutexWaiter* _waiters;
    private PollSource[] _sources = new PollSource[8];
    private int _count;
    private int _registered;
    private int _changes;
    private bool _waitvMissing;
    private long _nextRebalance;
    private int _grantRotation;
    private PollSource[] _competitors = new PollSource[8];
    private readonly PollSource?[] _armedSources = new PollSource?[MaxSources];
    private bool _serving; // some source's peer calls actively (set at each rebalance)

    /// <summary>How many actively calling peers may spin at once.</summary>
    internal static int SpinGrants { get; } = Math.Max(1, Environment.ProcessorCount);

    private static readonly long RebalanceTicks = Stopwatch.Frequency / 1000; // 1 ms

    public Poller(string name, Poller? predecessor = null)
    {
        _doorbell = (int*)NativeMemory.AlignedAlloc(64, 64);
        *_doorbell = 0;
        _waiters = (LinuxNative.FutexWaiter*)NativeMemory.AlignedAlloc((nuint)(sizeof(LinuxNative.FutexWaiter) * LinuxNative.FutexWaitvMax), 64);
        if (predecessor is not null)
        {
            Adopt(predecessor);
        }

        _thread = new Thread(Run) { IsBackground = true, Name = name };
        PollerWatchdog.Awake();
        _thread.UnsafeStart(); // no captured ExecutionContext: the poller serves every caller
    }

    /// <summary>Sources registered (including ones about to be added or removed).</summary>
    public int Registered => Volatile.Read(ref _registered);

    [ThreadStatic]
    private static bool t_isPollerThread;

    /// <summary>True on any poller's thread (which serves many connections and must not wait on one peer).</summary>
    public static bool IsPollerThread => t_isPollerThread;

    /// <summary>Test hook: the calling thread acts as a poller (the fuzzer polls a connection's inbound side by hand).</summary>
    internal static void ActAsPollerForTests() => t_isPollerThread = true;

    /// <summary>Registers a source; false when the poller is full.</summary>
    public bool TryAdd(PollSource source)
    {
        lock (_gate)
        {
            if (_registered >= MaxSources)
            {
                return false;
            }

            _registered++;
            source.Owner = this;
            _added.Add(source);
        }

        Ring();
        return true;
    }

    /// <summary>Wakes the poller to look at its registrations (after an add, a removal request or a cancellation).</summary>
    public void Ring()
    {
        Interlocked.Exchange(ref _changes, 1); // full fence before the doorbell is read (Dekker with Park)
        SharedWait.Wake(_doorbell);
    }

    private void Run()
    {
        t_isPollerThread = true;
        Volatile.Write(ref _nativeThreadId, LinuxNative.GetTid());
        long idleSince = Stopwatch.GetTimestamp();
        while (!_retired)
        {
            if (Volatile.Read(ref _changes) != 0)
            {
                ApplyChanges();
            }

            long now = Stopwatch.GetTimestamp();
            if (now >= _nextRebalance)
            {
                RebalanceSpinGrants(now);
            }

            if (PollAll(now))
            {
                idleSince = now;
                continue;
            }

            if (SpinWhileExpected(now))
            {
                continue;
            }

            Park();
        }

        PollerWatchdog.Asleep(); // this thread was handed over: its successor polls everything now
    }

    /// <summary>Polls every source once; true when one did some work (or finished).</summary>
    private bool PollAll(long now)
    {
        bool worked = false;
        PollSource[] sources = _sources;
        for (int i = 0; i < _count && !_retired; i++)
        {
            PollSource source = sources[i];
            if (ReferenceEquals(source, _heldByPredecessor) && !PredecessorReleased())
            {
                continue; // the stuck poller this one replaced is still inside it
            }

            if (!EnterPoll(source, now))
            {
                return true; // handed over while between polls: nothing more is this thread's
            }

            PollResult result;
            try
            {
                result = source.RemoveRequested ? PollResult.Finished : source.Poll(now);
            }
            catch (Exception ex)
            {
                // A source must handle its own failures; one that does not is dropped, never the poller.
                Trace.TraceError($"OffloadRpc: a poll source failed and was dropped: {ex}");
                result = PollResult.Finished;
            }

            if (!ExitPoll())
            {
                return true; // the watchdog handed this poller's sources over while it was stuck in this one
            }

            if (result == PollResult.Worked)
            {
                worked = true;
            }
            else if (result == PollResult.Finished)
            {
                RemoveAt(i--);
                worked = true;
            }
        }

        return worked;
    }

    /// <summary>
    /// Spins (polling everything) while some source expects work soon and the process has a core to spare.
    /// True when work turned up; false when the poller should sleep.
    /// </summary>
    private bool SpinWhileExpected(long now)
    {
        long until = 0;
        PollSource[] sources = _sources;
        for (int i = 0; i < _count; i++)
        {
            until = Math.Max(until, sources[i].SpinUntil(now));
        }

        if (until <= now || !SpinGate.TryEnter())
        {
            return false;
        }

        try
        {
            long nextYield = now + SpinGate.YieldIntervalTicks;
            while (true)
            {
                for (int i = 0; i < 8; i++)
                {
                    Thread.SpinWait(1);
                }

                if (Volatile.Read(ref _changes) != 0)
                {
                    return true;
                }

                now = Stopwatch.GetTimestamp();
                if (PollAll(now) || _retired)
                {
                    return true;
                }

                if (now > until)
                {
                    return false;
                }

                if (now >= nextYield)
                {
                    // A poller serving actively calling clients keeps its core (yielding it would put it
                    // behind every spinning client, and all of them would then wait for it), unless a call it
                    // serves streams its result: the producer, on the thread pool, then waits for the core this
                    // poller spins on (a frame stream ran at a third of its rate). Others offer theirs.
                    if (!_serving || AnyWorkElsewhere())
                    {
                        SpinGate.YieldCore();
                    }

                    nextYield = now + SpinGate.YieldIntervalTicks;
                }
            }
        }
        finally
        {
            SpinGate.Exit();
        }
    }

    private bool AnyWorkElsewhere()
    {
        PollSource[] sources = _sources;
        for (int i = 0; i < _count; i++)
        {
            if (sources[i].HasWorkElsewhere)
            {
                return true;
            }
        }

        return false;
    }

    /// <summary>Arms every source and the doorbell, polls once more, then sleeps on all the words at once.</summary>
    private void Park()
    {
        int slice = -1;
        Interlocked.Exchange(ref *_doorbell, 1);
        _waiters[0] = LinuxNative.FutexWaiter.For(_doorbell, 1);
        PollSource[] sources = _sources;
        int armed = 0;
        for (int i = 0; i < _count; i++)
        {
            if (ReferenceEquals(sources[i], _heldByPredecessor))
            {
                continue; // its predecessor rings this poller when it lets go of it
            }

            _armedSources[armed++] = sources[i];
            sources[i].Arm(out int* word, out int expected);
            _waiters[armed] = LinuxNative.FutexWaiter.For(word, expected);
            int sourceSlice = sources[i].SleepSliceMilliseconds;
            if (sourceSlice >= 0 && (slice < 0 || sourceSlice < slice))
            {
                slice = sourceSlice;
            }
        }

        // The arms are published (each with a full fence): whatever a waker did before them is visible now.
        if (Volatile.Read(ref _changes) == 0 && !PollAll(Stopwatch.GetTimestamp()))
        {
            long sleptAt = Stopwatch.GetTimestamp();
            PollerWatchdog.Asleep();
            int woken = Sleep(armed + 1, slice);
            PollerWatchdog.Awake();
            if (woken > 0 && woken <= armed && WokenSource(woken) is { } source)
            {
                source.OnWoken(Stopwatch.GetTimestamp() - sleptAt); // futex_waitv names the word that was woken
            }
        }

        if (_retired)
        {
            return;
        }

        Volatile.Write(ref *_doorbell, 0);
        sources = _sources;
        for (int i = 0; i < _count; i++)
        {
            sources[i].Disarm();
        }
    }

    /// <summary>Sleeps on the armed words; returns the index of the one that was woken, or -1.</summary>
    private int Sleep(int words, int slice)
    {
        if (!_waitvMissing)
        {
            int result = LinuxNative.FutexWaitv(_waiters, words, slice);
            if (result != -LinuxNative.ENOSYS)
            {
                return result;
            }

            // A kernel older than 5.16: no futex_waitv. Sleep on the doorbell in short slices instead.
            _waitvMissing = true;
            Trace.TraceWarning("OffloadRpc: futex_waitv is not available (Linux < 5.16); the poller falls back to 1 ms polling while idle.");
        }

        LinuxNative.FutexWait(_doorbell, 1, slice < 0 ? 1 : Math.Min(slice, 1));
        return -1;
    }

    /// <summary>Grants spinning to at most <see cref="SpinGrants"/> actively calling peers, rotating among them.</summary>
    private void RebalanceSpinGrants(long now)
    {
        _nextRebalance = now + RebalanceTicks;
        int competing = 0;
        for (int i = 0; i < _count; i++)
        {
            PollSource source = _sources[i];
            if (source.CompetesForSpin(now))
            {
                if (competing == _competitors.Length)
                {
                    Array.Resize(ref _competitors, competing * 2);
                }

                _competitors[competing++] = source;
            }
            else
            {
                source.GrantSpin(true); // idle or a client: when it starts calling it competes from the next round
            }
        }

        _serving = competing > 0;
        if (competing == 0)
        {
            return;
        }

        int first = _grantRotation % competing;
        for (int i = 0; i < competing; i++)
        {
            int offset = (i - first + competing) % competing;
            _competitors[i].GrantSpin(offset < SpinGrants);
            _competitors[i] = null!;
        }

        _grantRotation = first + SpinGrants;
    }

    private void ApplyChanges()
    {
        Volatile.Write(ref _changes, 0);
        Interlocked.MemoryBarrier();
        lock (_gate)
        {
            foreach (PollSource source in _added)
            {
                if (_count == _sources.Length)
                {
                    Array.Resize(ref _sources, _sources.Length * 2);
                }

                _sources[_count++] = source;
            }

            _added.Clear();
        }

        for (int i = 0; i < _count; i++)
        {
            if (_sources[i].RemoveRequested)
            {
                RemoveAt(i--);
            }
        }
    }

    private void RemoveAt(int index)
    {
        PollSource source = _sources[index];
        _sources[index] = _sources[--_count];
        _sources[_count] = null!;
        lock (_gate)
        {
            _registered--;
        }

        try
        {
            source.OnRemoved();
        }
        catch (Exception ex)
        {
            Trace.TraceError($"OffloadRpc: a poll source failed on removal: {ex}");
        }
    }
}

/// <summary>
/// The process's pollers: sources go to the least loaded one, and a new poller starts only when every
/// one holds <see cref="Poller.MaxSources"/> sources (or <see cref="EnsureThreads"/> asks for more).
/// </summary>
internal static class PollerGroup
{
    private static readonly object s_gate = new();
    private static Poller[] s_pollers = [];

    /// <summary>Poller threads running in this process.</summary>
    public static int ThreadCount => Volatile.Read(ref s_pollers).Length;

    /// <summary>The process's pollers right now.</summary>
    internal static Poller[] Pollers => Volatile.Read(ref s_pollers);

    /// <summary>A stuck poller was handed over: new sources go to its successor.</summary>
    internal static void Replace(Poller stuck, Poller successor)
    {
        lock (s_gate)
        {
            s_pollers = s_pollers.Select(p => ReferenceEquals(p, stuck) ? successor : p).ToArray();
        }
    }

    /// <summary>Starts pollers until there are at least <paramref name="count"/>.</summary>
    public static void EnsureThreads(int count)
    {
        lock (s_gate)
        {
            while (s_pollers.Length < count)
            {
                s_pollers = [.. s_pollers, new Poller($"OffloadRpc poller {s_pollers.Length + 1}")];
            }
        }
    }

    /// <summary>Registers <paramref name="source"/> with the least loaded poller, starting one when all are full.</summary>
    public static void Add(PollSource source)
    {
        lock (s_gate)
        {
            Poller? best = null;
            foreach (Poller poller in s_pollers)
            {
                if (best is null || poller.Registered < best.Registered)
                {
                    best = poller;
                }
            }

            if (best is null || !best.TryAdd(source))
            {
                var poller = new Poller($"OffloadRpc poller {s_pollers.Length + 1}");
                s_pollers = [.. s_pollers, poller];
                bool added = poller.TryAdd(source);
                Debug.Assert(added, "a new poller has room");
            }
        }
    }
}
