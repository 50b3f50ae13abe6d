using System.Diagnostics;

namespace OffloadRpc.Transport;

/// <summary>
/// A poller whose thread is stuck in one source (code that runs inline on it blocks: a continuation that
/// waits synchronously, a service method's first call that computes for long) would hold up every other
/// connection it serves. The <see cref="PollerWatchdog"/> sees a poll that lasts too long and hands the
/// poller's sources to a new thread; the stuck thread finishes the one source it is in and then retires.
/// <para>
/// The hand-over is a compare-and-swap on <see cref="_state"/>: the poller moves it 0 -> 1 before each poll
/// and 1 -> 0 after; the watchdog moves it 1 -> 2 only while a poll is running. So the watchdog never takes
/// the sources while the poller touches its array (it does so only between polls), and a poller that
/// finds 2 on its way out of a poll touches nothing more.
/// </para>
/// </summary>
internal sealed partial class Poller
{
    private const int Idle = 0;
    private const int InPoll = 1;
    private const int HandedOver = 2;

    private int _state;
    private long _pollStartedAt;
    private PollSource? _current;
    private int _released;
    private bool _retired;
    private Poller? _predecessor;
    private PollSource? _heldByPredecessor;
    private Poller? _successor;

    private int _nativeThreadId;

    /// <summary>
    /// Watchdog: true when a poll has lasted past <paramref name="blockedTicks"/> with the thread asleep in
    /// it (blocked in code that waits: nothing else will run on it until that returns), or past
    /// <paramref name="busyTicks"/> even while it runs (computing). A thread that is merely runnable but
    /// preempted on a busy machine is not stuck: another thread would not run sooner.
    /// </summary>
    internal bool IsStuck(long now, long blockedTicks, long busyTicks)
    {
        if (Volatile.Read(ref _state) != InPoll)
        {
            return false;
        }

        long lasted = now - Volatile.Read(ref _pollStartedAt);
        return lasted > busyTicks || (lasted > blockedTicks && !IsRunnable(Volatile.Read(ref _nativeThreadId)));
    }

    /// <summary>Whether a thread of this process is running or runnable (state R in /proc), as far as can be told.</summary>
    private static bool IsRunnable(int threadId)
    {
        try
        {
            string stat = File.ReadAllText($"/proc/self/task/{threadId}/stat");
            int end = stat.LastIndexOf(')'); // the thread's name may hold spaces and parentheses
            return end >= 0 && end + 2 < stat.Length && stat[end + 2] == 'R';
        }
        catch (IOException)
        {
            return true; // cannot tell: do not hand over on a guess
        }
    }

    private bool EnterPoll(PollSource source, long now)
    {
        _current = source;
        Volatile.Write(ref _pollStartedAt, now);
        if (Interlocked.CompareExchange(ref _state, InPoll, Idle) == Idle)
        {
            return true;
        }

        Retire();
        return false;
    }

    private bool ExitPoll()
    {
        if (Interlocked.CompareExchange(ref _state, Idle, InPoll) == InPoll)
        {
            return true;
        }

        Retire();
        return false;
    }

    /// <summary>This thread's sources belong to its successor now: let go of the one it was in, and stop.</summary>
    private void Retire()
    {
        _retired = true;
        Volatile.Write(ref _released, 1);
        Volatile.Read(ref _successor)?.Ring(); // it may poll the source this thread held from now on
    }

    private bool PredecessorReleased()
    {
        if (Volatile.Read(ref _predecessor!._released) == 0)
        {
            return false;
        }

        _heldByPredecessor = null;
        return true;
    }

    private PollSource? WokenSource(int waiterIndex) => _armedSources[waiterIndex - 1];

    /// <summary>Watchdog: hands the sources of this (stuck) poller to a new one; false when the poll ended meanwhile.</summary>
    internal bool TryHandOver(out Poller? successor)
    {
        successor = null;
        if (Interlocked.CompareExchange(ref _state, HandedOver, InPoll) != InPoll)
        {
            return false;
        }

        successor = new Poller($"OffloadRpc poller (after a stall)", this);
        Volatile.Write(ref _successor, successor);
        if (Volatile.Read(ref _released) != 0)
        {
            successor.Ring(); // it already let go before it knew its successor
        }

        Trace.TraceWarning("OffloadRpc: a poller thread was held up for long in code that runs inline on it (a blocking continuation or service method); a new thread polls its other connections. Set RunContinuationsAsynchronously or DispatchToThreadPool for such code.");
        return true;
    }

    /// <summary>Takes over the sources of a poller that is stuck in a poll (it no longer touches its array).</summary>
    private void Adopt(Poller stuck)
    {
        _predecessor = stuck;
        _heldByPredecessor = stuck._current;
        lock (stuck._gate)
        {
            _sources = new PollSource[Math.Max(8, stuck._count + stuck._added.Count)];
            Array.Copy(stuck._sources, _sources, stuck._count);
            _count = stuck._count;
            foreach (PollSource source in stuck._added)
            {
                _sources[_count++] = source;
            }

            stuck._added.Clear();
            _registered = stuck._registered;
            stuck._registered = MaxSources; // the stuck one takes no new sources
        }

        for (int i = 0; i < _count; i++)
        {
            _sources[i].Owner = this;
        }

        _changes = 1; // look at removal requests that rang the stuck poller
    }
}

/// <summary>
/// Watches the process's pollers for a poll that lasts too long and has them handed over. It ticks every
/// 10 ms only while some poller is awake; when every poller sleeps it sleeps too (idle costs nothing).
/// </summary>
internal static unsafe class PollerWatchdog
{
    /// <summary>A poll blocked (asleep in user code) this long holds up too many other connections.</summary>
    private static readonly long BlockedTicks = Stopwatch.Frequency / 50; // 20 ms

    /// <summary>A poll that computes this long holds them up as well.</summary>
    private static readonly long BusyTicks = Stopwatch.Frequency; // 1 s

    private static readonly int[] s_word = GC.AllocateArray<int>(16, pinned: true);
    private static int s_awake;
    private static int s_started;

    /// <summary>A poller is awake (started, or woke from a sleep).</summary>
    public static void Awake()
    {
        if (Interlocked.Increment(ref s_awake) == 1)
        {
            if (Interlocked.Exchange(ref s_started, 1) == 0)
            {
                new Thread(Run) { IsBackground = true, Name = "OffloadRpc watchdog" }.UnsafeStart();
            }

            fixed (int* word = s_word)
            {
                SharedWait.Wake(word);
            }
        }
    }

    /// <summary>A poller goes to sleep (or retires).</summary>
    public static void Asleep() => Interlocked.Decrement(ref s_awake);

    private static void Run()
    {
        var noSpin = new AdaptiveSpin(TimeSpan.Zero);
        var pollersAwake = new AnyAwake();
        while (true)
        {
            fixed (int* word = s_word)
            {
                var armed = new SharedWait.FlagArmed<AnyAwake>(pollersAwake, word, singleWaiter: true);
                SharedWait.Sleep(ref armed, noSpin, sleepSliceMilliseconds: -1);
            }

            Thread.Sleep(10);
            long now = Stopwatch.GetTimestamp();
            foreach (Poller poller in PollerGroup.Pollers)
            {
                if (poller.IsStuck(now, BlockedTicks, BusyTicks) && poller.TryHandOver(out Poller? successor))
                {
                    PollerGroup.Replace(poller, successor!);
                }
            }
        }
    }

    private readonly struct AnyAwake : IWaitCondition
    {
        public bool IsSatisfied() => Volatile.Read(ref s_awake) > 0;

        public bool IsAbandoned() => false;
    }
}
