using System.Runtime.InteropServices;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>The thread-free form of the wait primitive: the process's poller completes waits on futex words.</summary>
public sealed class AsyncWaitTests : IDisposable
{
    private readonly unsafe int* _words = (int*)NativeMemory.AlignedAlloc(64 * 64, 64);

    public unsafe AsyncWaitTests() => new Span<byte>(_words, 64 * 64).Clear();

    public unsafe void Dispose() => NativeMemory.AlignedFree(_words);

    private unsafe FlagCondition Word(int index) => new(&_words[index * 16]);

    [Fact]
    public async Task Many_waits_complete_each_when_its_own_word_is_woken_and_not_before()
    {
        const int Waits = 50; // fewer than one poller's words, more than the spin window covers
        var conditions = new FlagCondition[Waits];
        var tasks = new Task<bool>[Waits];
        for (int i = 0; i < Waits; i++)
        {
            conditions[i] = Word(i);
            tasks[i] = SharedWait.WaitAsync(conditions[i], sleepSliceMilliseconds: -1).AsTask();
        }

        await Task.Delay(50); // past every spin: the poller sleeps on all the words now
        Assert.All(tasks, t => Assert.False(t.IsCompleted));
        for (int i = Waits - 1; i >= 0; i--)
        {
            conditions[i].Signal();
            Assert.True(await tasks[i].WaitAsync(TimeSpan.FromSeconds(30)));
            Assert.All(tasks[..i], t => Assert.False(t.IsCompleted));
        }
    }

    [Fact]
    public async Task A_cancelled_wait_ends_unsatisfied_and_the_next_one_still_works()
    {
        var condition = Word(0);
        using var cancel = new CancellationTokenSource();
        ValueTask<bool> wait = SharedWait.WaitAsync(condition, sleepSliceMilliseconds: -1, cancel.Token);
        await Task.Delay(20);
        cancel.Cancel();
        Assert.False(await wait.AsTask().WaitAsync(TimeSpan.FromSeconds(30)));

        Task<bool> next = SharedWait.WaitAsync(condition, sleepSliceMilliseconds: -1).AsTask();
        condition.Signal();
        Assert.True(await next.WaitAsync(TimeSpan.FromSeconds(30)));
    }

    /// <summary>A condition on a word of its own: "ready" is a second int next to the futex word.</summary>
    private sealed unsafe class FlagCondition(int* word) : IAsyncWaitCondition
    {
        private int _ready;

        public void Signal()
        {
            Interlocked.Exchange(ref _ready, 1);
            SharedWait.Wake(word);
        }

        public bool IsSatisfied() => Volatile.Read(ref _ready) != 0;

        public bool IsAbandoned() => false;

        public void Arm(out int* armed, out int expected)
        {
            Interlocked.Exchange(ref *word, 1);
            armed = word;
            expected = 1;
        }
    }
}
